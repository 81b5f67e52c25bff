"""The sampler's draw/gather split and EpisodeLoader's fast paths: no DataLoader without workers, plans from workers."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from test_episodes import episodes_of
from torch.utils.data import DataLoader, get_worker_info

from datamodules import (
    ClassEpisodeSampler,
    ClassImages,
    EpisodeBatch,
    EpisodeLoader,
    EpisodeStream,
    EpisodicDataModule,
    Sinusoid,
)
from datamodules.episodes import EpisodePlan, planned
from datamodules.sinusoid import SinusoidTasks


def old_sample(sampler: ClassEpisodeSampler, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:
    """ClassEpisodeSampler.sample before draw/gather (as of commit f1224d8): the reference for bit-identity."""
    self = sampler
    n, k, q = self.ways, self.shots, self.queries
    classes = torch.rand(num_tasks, self.data.num_classes, generator=generator).topk(n, dim=1).indices
    keys = torch.rand(num_tasks, n, self._max_count, generator=generator)
    if self._max_count != int(self._counts.min()):
        missing = torch.arange(self._max_count) >= self._counts[classes].unsqueeze(-1)
        keys = keys.masked_fill(missing, 2.0)
    within = keys.argsort(dim=-1)[..., : k + q]
    index = self.data.offsets[classes].unsqueeze(-1) + within
    images = self.data.images
    support = images.index_select(0, index[..., :k].flatten()).view(num_tasks, n * k, *images.shape[1:])
    query = images.index_select(0, index[..., k:].flatten()).view(num_tasks, n * q, *images.shape[1:])
    support_y = torch.arange(n).repeat_interleave(k)
    query_y = torch.arange(n).repeat_interleave(q)
    return EpisodeBatch(support, support_y.expand(num_tasks, -1).clone(), query, query_y.expand(num_tasks, -1).clone())


def random_images(counts: list[int], side: int = 3) -> ClassImages:
    g = torch.Generator().manual_seed(len(counts))
    images = torch.randint(0, 256, (sum(counts), 2, side, side), dtype=torch.uint8, generator=g)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    return ClassImages(images, offsets, [f"c{i}" for i in range(len(counts))])


def assert_identical(a: EpisodeBatch, b: EpisodeBatch) -> None:
    assert isinstance(a, EpisodeBatch) and isinstance(b, EpisodeBatch)
    assert None in (a.ways, b.ways) or a.ways == b.ways
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


@pytest.mark.parametrize("counts", [[20] * 30, [7, 25, 9, 40, 8, 12, 30]], ids=["even", "uneven"])
@pytest.mark.parametrize("num_tasks", [1, 3, 16])
def test_sample_and_draw_gather_are_bit_identical_to_the_old_sampler(counts, num_tasks):
    sampler = ClassEpisodeSampler(random_images(counts), ways=5, shots=2, queries=5)
    for seed in range(5):
        old = old_sample(sampler, num_tasks, torch.Generator().manual_seed(seed))
        assert_identical(sampler.sample(num_tasks, torch.Generator().manual_seed(seed)), old)
        index = sampler.draw(num_tasks, torch.Generator().manual_seed(seed))
        assert index.dtype == torch.int64 and index.shape == (num_tasks, 5, 7)
        assert_identical(sampler.gather(index), old)
        assert all(part.is_contiguous() for part in sampler.gather(index).tensors)
        # Draws concatenated along the task dimension gather as one batch.
        halves = sampler.gather(torch.cat([index[:1], index[1:]]))
        assert_identical(halves, old)


def test_gather_returns_fresh_labels_and_large_batches_in_two_copies(monkeypatch):
    sampler = ClassEpisodeSampler(random_images([20] * 10), ways=5, shots=1, queries=3)
    index = sampler.draw(4, torch.Generator().manual_seed(0))
    first = sampler.gather(index)
    first.support_y.fill_(9)
    first.query_y.fill_(9)
    assert_identical(sampler.gather(index), old_sample(sampler, 4, torch.Generator().manual_seed(0)))
    monkeypatch.setattr("datamodules.episodes._ONE_GATHER_BYTES", 0)  # the path for batches of large images
    assert_identical(sampler.gather(index), old_sample(sampler, 4, torch.Generator().manual_seed(0)))


def stream(split: str, source=None, **kwargs) -> EpisodeStream:
    source = source or ClassEpisodeSampler(random_images([20] * 12), 5, 1, 2)
    kwargs = {"episodes": 22, "tasks_per_batch": 4, "seed": 0} | kwargs
    return EpisodeStream(source, split, **kwargs)


@pytest.mark.parametrize("split", ["train", "val"])
def test_stream_batches_are_the_gathered_plans_and_match_the_old_sampler(split):
    s = stream(split)
    for j in range(len(s)):
        batch = s.batch(j)
        assert_identical(s.source.gather(s.plan(j)), batch)
        if split == "val":  # per-episode generators; the last batch has 2 episodes
            assert batch.num_tasks == (4 if j < 5 else 2)
            for t, i in enumerate(range(4 * j, 4 * j + batch.num_tasks)):
                old = old_sample(s.source, 1, s._episode_generator(i))
                assert_identical(EpisodeBatch(*(part[t : t + 1] for part in batch.tensors), batch.ways), old)
        else:
            assert_identical(batch, old_sample(s.source, 4, s._train_generator(j)))


class MainProcessOnly(ClassEpisodeSampler):
    """Fails when a DataLoader worker gathers images: workers must send plans."""

    def gather(self, index):
        assert get_worker_info() is None, "images gathered in a worker"
        return super().gather(index)


@pytest.mark.parametrize("split", ["train", "val"])
def test_loader_gives_the_same_batches_with_0_and_2_workers_and_workers_send_plans(split):
    source = MainProcessOnly(random_images([20] * 12), 5, 1, 2)
    expected = [stream(split, source).batch(j) for j in range(len(stream(split, source)))]
    for num_workers in (0, 2):
        loader = EpisodeLoader(stream(split, source), num_workers)
        batches = list(loader)
        assert len(batches) == len(loader) == len(expected)
        for batch, reference in zip(batches, expected, strict=True):
            assert_identical(batch, reference)
            assert batch.support_x.dtype == torch.uint8 and batch.support_y.dtype == torch.int64
        assert loader.state_dict()["batches_consumed"] == len(expected)
    # What the workers put on the result queue: plans, whose numpy index is pickled inline.
    messages = list(DataLoader.__iter__(loader))
    assert all(isinstance(m, EpisodePlan) and isinstance(m.index, np.ndarray) for m in messages)
    assert [size for m in messages for size in m.sizes] == [b.num_tasks for b in expected]
    plans = [plan for m in messages for plan in torch.from_numpy(m.index).split(m.sizes)]
    for plan, reference in zip(plans, expected, strict=True):
        assert_identical(source.gather(plan), reference)


@pytest.mark.parametrize("num_workers, plan_episodes", [(2, 1), (3, 8), (3, 100)])
@pytest.mark.parametrize("split", ["train", "val"])
def test_plan_messages_keep_the_batch_order_and_resume(num_workers, plan_episodes, split):
    """Messages of several batches are dealt round-robin to the workers, after skipping the resumed batches."""
    reference = stream(split, episodes=60, tasks_per_batch=2)
    expected = [reference.batch(j) for j in range(5, len(reference))]
    resumed = stream(split, episodes=60, tasks_per_batch=2)
    resumed.plan_episodes = plan_episodes
    loader = EpisodeLoader(resumed, num_workers)
    loader.load_state_dict({"epoch": 0, "batches_consumed": 5})
    batches = list(loader)
    assert len(batches) == len(expected) == 25
    for batch, want in zip(batches, expected, strict=True):
        assert_identical(batch, want)
    assert loader.state_dict() == {"epoch": 0, "batches_consumed": 30}


def test_a_plain_dataloader_over_the_stream_still_gets_batches():
    loader = DataLoader(stream("val"), batch_size=None, num_workers=2)
    batches = list(loader)
    assert all(isinstance(b, EpisodeBatch) for b in batches)
    assert episodes_of(batches) == episodes_of(stream("val"))


def test_no_dataloader_iterator_without_workers(monkeypatch):
    def refuse(self):
        raise AssertionError("DataLoader iterator used with 0 workers")

    monkeypatch.setattr(DataLoader, "__iter__", refuse)
    loader = EpisodeLoader(stream("train", episodes=40), 0)
    loader.load_state_dict({"epoch": 1, "batches_consumed": 3})
    reference = stream("train", episodes=40)
    reference.epoch = 1
    assert episodes_of(loader) == episodes_of([reference.batch(j) for j in range(3, 10)])
    assert loader.state_dict() == {"epoch": 1, "batches_consumed": 10}


def test_unplanned_sources_still_send_batches_from_workers():
    source = SinusoidTasks(shots=3, queries=4)
    assert planned(source) is None and planned(ClassEpisodeSampler(random_images([5] * 5), 2, 1, 1)) is not None
    with pytest.raises(TypeError, match="no draw"):
        stream("train", source).plan(0)
    expected = list(stream("train", source))
    batches = list(EpisodeLoader(stream("train", source), 2))
    assert len(batches) == len(expected) == 6
    for batch, reference in zip(batches, expected, strict=True):
        assert_identical(batch, reference)
    assert isinstance(next(iter(Sinusoid(num_workers=2, train_episodes=50).train_dataloader())), EpisodeBatch)


class InMemory(EpisodicDataModule):
    def __init__(self, num_workers: int) -> None:
        super().__init__(5, 1, 2, tasks_per_batch=2, train_episodes=12, val_episodes=6, num_workers=num_workers)

    def load_split(self, split: str) -> ClassImages:
        return random_images([20] * 12)


class Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[str, int, list[torch.Tensor]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(("train", self.current_epoch, [t.clone() for t in batch.tensors]))
        return self.weight * batch.support_x.mean()

    def validation_step(self, batch, batch_idx):
        self.seen.append(("val", self.current_epoch, [t.clone() for t in batch.tensors]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_fit_sees_the_same_batches_with_0_and_2_workers():
    runs = []
    for num_workers in (0, 2):
        module = Recorder()
        trainer = pl.Trainer(
            max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0,
        )  # fmt: skip
        trainer.fit(module, datamodule=InMemory(num_workers))
        runs.append(module.seen)
    assert [(split, epoch) for split, epoch, _ in runs[0]] == [
        (split, epoch) for epoch in range(2) for split in ["train"] * 6 + ["val"] * 3
    ]
    assert runs[0][0][2][0].dtype == torch.float32  # uint8 images became floats on the device
    assert len(runs[0]) == len(runs[1])
    for (*key0, batch0), (*key1, batch1) in zip(*runs, strict=True):
        assert key0 == key1 and all(torch.equal(a, b) for a, b in zip(batch0, batch1, strict=True))
