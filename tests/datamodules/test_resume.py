"""Resuming a fit from a checkpoint continues the training episode stream of an uninterrupted run."""

import hashlib

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint, OnExceptionCheckpoint
from test_episodes import episodes_of, id_images

from datamodules import ClassEpisodeSampler, EpisodeLoader, EpisodeStream, Sinusoid
from lightning_meta import MAML, MLP

EPOCHS, BATCHES = 2, 6


def digest(batch) -> str:
    data = b"".join(t.detach().cpu().numpy().tobytes() for t in batch.tensors)
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class Preempted(Exception):
    pass


class RecordBatches(Callback):
    """Records (epoch, batch_idx, digest of the batch) for every training batch the loop runs."""

    def __init__(self, fail_at: tuple[int, int] | None = None) -> None:
        self.seen: list[tuple[int, int, str]] = []
        self.fail_at = fail_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.fail_at:
            raise Preempted
        self.seen.append((trainer.current_epoch, batch_idx, digest(batch)))


def data(num_workers: int) -> Sinusoid:
    return Sinusoid(
        shots=3, queries=3, tasks_per_batch=2, train_episodes=2 * BATCHES, val_episodes=2, test_episodes=2,
        num_workers=num_workers,
    )  # fmt: skip


def model() -> MAML:
    torch.manual_seed(0)
    return MAML(MLP(1, (8,), 1), inner_lr=0.01, inner_steps=1, inner_steps_eval=1, task_batching="loop")


def fit(num_workers: int, callbacks: list[Callback], ckpt_path: str | None = None, root=None, by_steps=False) -> MAML:
    # Bounded by max_steps, Lightning treats every resume as a restart: another restore path.
    limit = {"max_epochs": -1, "max_steps": EPOCHS * BATCHES} if by_steps else {"max_epochs": EPOCHS}
    trainer = pl.Trainer(
        **limit, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, inference_mode=False, callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks), default_root_dir=root,
    )  # fmt: skip
    module = model()
    trainer.fit(module, datamodule=data(num_workers), ckpt_path=ckpt_path)
    return module


@pytest.fixture(scope="module", params=[0, 2], ids=lambda n: f"workers{n}")
def uninterrupted(request, tmp_path_factory):
    """One uninterrupted fit that saves a checkpoint after every batch, after every epoch and after validation."""
    root = tmp_path_factory.mktemp(f"uninterrupted{request.param}")
    record = RecordBatches()
    callbacks = [
        record,
        ModelCheckpoint(root / "step", "{step}", every_n_train_steps=1, save_top_k=-1),
        ModelCheckpoint(root / "train_end", "{epoch}", save_top_k=-1, save_on_train_epoch_end=True),
        # A monitor only to give this callback a state key of its own; save_top_k=-1 keeps every file.
        ModelCheckpoint(root / "val_end", "{epoch}", "val/loss", save_top_k=-1, save_on_train_epoch_end=False),
    ]
    weights = fit(request.param, callbacks, root=root).state_dict()
    assert [(e, b) for e, b, _ in record.seen] == [(e, b) for e in range(EPOCHS) for b in range(BATCHES)]
    assert len({d for *_, d in record.seen}) == EPOCHS * BATCHES
    return {"num_workers": request.param, "root": root, "seen": record.seen, "weights": weights}


def resume_and_compare(run: dict, ckpt_path, first: tuple[int, int], by_steps: bool = False) -> None:
    record = RecordBatches()
    weights = fit(run["num_workers"], [record], str(ckpt_path), by_steps=by_steps).state_dict()
    start = run["seen"].index(next(s for s in run["seen"] if s[:2] == first))
    assert record.seen == run["seen"][start:]
    torch.testing.assert_close(weights, run["weights"])


@pytest.mark.parametrize(
    "checkpoint, first, by_steps",
    [
        ("step/step=9.ckpt", (1, 3), False),  # mid-epoch: after batch 3 of epoch 1
        ("step/step=6.ckpt", (1, 0), False),  # after the last batch of epoch 0, before its epoch end
        ("train_end/epoch=0.ckpt", (1, 0), False),
        ("val_end/epoch=0.ckpt", (1, 0), False),
        ("step/step=6.ckpt", (1, 0), True),
        ("train_end/epoch=0.ckpt", (1, 0), True),
    ],
)
def test_resume_sees_the_batches_of_the_uninterrupted_run(uninterrupted, checkpoint, first, by_steps):
    resume_and_compare(uninterrupted, uninterrupted["root"] / checkpoint, first, by_steps)


def test_resume_after_preemption_retrains_the_interrupted_batch(uninterrupted, tmp_path):
    """A checkpoint taken on an exception mid-batch resumes at that batch, which never finished its step."""
    with pytest.raises(Preempted):
        fit(
            uninterrupted["num_workers"],
            [RecordBatches(fail_at=(1, 2)), OnExceptionCheckpoint(tmp_path, "interrupted")],
        )
    resume_and_compare(uninterrupted, tmp_path / "interrupted.ckpt", (1, 2))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_datamodule_state_dict_round_trip(num_workers):
    dm = data(num_workers)
    assert dm.state_dict() == {}  # nothing to save before a training DataLoader exists
    full = list(dm.train_dataloader())
    assert len(full) == BATCHES
    loader = dm.train_dataloader()
    assert isinstance(loader, _Stateful)  # what Lightning checks to save and restore it
    iterator = iter(loader)
    take(iterator, 2)
    # Workers have prefetched more batches than the two taken; only those two count.
    state = dm.state_dict()
    assert state == {"train": {"epoch": 0, "batches_consumed": 2}} and loader.state_dict() == state["train"]
    resumed_dm = data(num_workers)
    resumed_dm.load_state_dict(state)
    resumed = resumed_dm.train_dataloader()
    assert len(resumed) == BATCHES
    assert episodes_of(resumed) == episodes_of(full[2:])
    # The resume point is used once: the next iteration is a whole epoch again.
    assert episodes_of(resumed) == episodes_of(full)
    assert resumed_dm.state_dict() == {"train": {"epoch": 0, "batches_consumed": BATCHES}}
    # A position loaded by one Trainer run does not reach the next run, which calls setup first.
    resumed_dm.load_state_dict(state)
    resumed_dm.setup("fit")
    assert episodes_of(resumed_dm.train_dataloader()) == episodes_of(full)


def test_state_saved_after_an_epochs_last_batch_resumes_at_the_next_epoch():
    stream = EpisodeStream(ClassEpisodeSampler(id_images([20] * 12), 5, 1, 2), "train", 24, 4, seed=0)
    loader = EpisodeLoader(stream, num_workers=0)
    loader.load_state_dict({"epoch": 3, "batches_consumed": len(stream)})
    resumed = episodes_of(loader)
    stream.epoch = 4
    assert resumed == episodes_of(stream)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_ddp_rank_resumes_its_own_stream(num_workers):
    """Ranks step in lockstep, so rank 0's saved position holds for every rank's own episodes."""
    sampler = ClassEpisodeSampler(id_images([20] * 12), 5, 1, 2)
    for rank in range(2):
        stream = EpisodeStream(sampler, "train", 40, 4, seed=0, rank=rank, world_size=2)
        stream.epoch = 2
        expected = episodes_of([stream.batch(j) for j in range(3, len(stream))])
        loader = EpisodeLoader(EpisodeStream(sampler, "train", 40, 4, 0, rank, 2), num_workers)
        loader.load_state_dict({"epoch": 2, "batches_consumed": 3})
        assert episodes_of(loader) == expected
