"""train_batches="labelled": the training split as plain labelled batches for supervised pre-training."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.types import _Stateful
from test_episodes import id_images

from datamodules import EpisodicDataModule, LabelledBatch, Omniglot, Sinusoid
from datamodules.base import LabelledLoader

COUNTS = {"train": [7, 9, 8, 6, 10, 7], "val": [6] * 5, "test": [6] * 5}  # uneven classes on purpose
IMAGES = sum(COUNTS["train"])


class IdBundle(EpisodicDataModule):
    """Every image holds its own index in the split, so batches can be traced back to their class."""

    def __init__(self, rank: int = 0, world_size: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rank, self.world = rank, world_size
        self.augmented = 0

    def load_split(self, split: str):
        return id_images(COUNTS[split])

    def _rank_and_world(self):
        return self.rank, self.world

    def augment_images(self, images):
        self.augmented += 1
        return images + 1000


def labelled(**kwargs) -> IdBundle:
    settings = {"ways": 3, "shots": 1, "queries": 2, "train_batches": "labelled", "batch_size": 4, **kwargs}
    dm = IdBundle(**settings)
    dm.setup("fit")
    return dm


def epoch_of(dm: IdBundle, epoch: int) -> list[LabelledBatch]:
    dm._current_epoch = lambda: epoch  # what the trainer's epoch would be
    return list(dm.train_dataloader())


def class_of_index(index: torch.Tensor) -> torch.Tensor:
    offsets = torch.tensor([0, *torch.tensor(COUNTS["train"]).cumsum(0).tolist()])
    return torch.searchsorted(offsets, index, right=True) - 1


def test_labels_are_the_classes_of_the_images_and_cover_every_training_class():
    dm = labelled()
    assert dm.num_train_classes == len(COUNTS["train"])
    batches = epoch_of(dm, 0)
    assert all(isinstance(b, LabelledBatch) and b.images.shape == (4, 1, 1, 1) for b in batches)
    assert len(batches) == IMAGES // 4 == len(dm.train_dataloader())
    index = torch.cat([b.images.flatten() for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert torch.equal(labels, class_of_index(index))
    assert len(set(index.tolist())) == len(index) == IMAGES - IMAGES % 4  # each image once; full batches only
    assert set(labels.tolist()) == set(range(dm.num_train_classes))


def test_a_new_order_every_epoch_fixed_by_seed_and_epoch():
    first, second = (torch.cat([b.images.flatten() for b in epoch_of(labelled(), e)]) for e in (0, 1))
    again = torch.cat([b.images.flatten() for b in epoch_of(labelled(), 1)])
    other_seed = torch.cat([b.images.flatten() for b in epoch_of(labelled(seed=1), 1)])
    assert not torch.equal(first, second)
    assert torch.equal(second, again)
    assert not torch.equal(second, other_seed)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_ranks_get_disjoint_equal_shards(world_size):
    shards = [
        torch.cat([b.images.flatten() for b in epoch_of(labelled(rank=r, world_size=world_size, batch_size=3), 1)])
        for r in range(world_size)
    ]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    everything = torch.cat(shards).tolist()
    assert len(set(everything)) == len(everything)  # disjoint
    assert len(everything) >= IMAGES - world_size * 3  # at most a tail is dropped


def test_validation_and_test_episodes_are_those_of_episode_mode():
    episodic = IdBundle(ways=3, shots=1, queries=2, val_episodes=5, test_episodes=4, tasks_per_batch=2)
    pretraining = IdBundle(ways=3, shots=1, queries=2, val_episodes=5, test_episodes=4, tasks_per_batch=2,
                           train_batches="labelled", batch_size=8)  # fmt: skip
    for dm in (episodic, pretraining):
        dm.setup("fit")
        dm.setup("test")
    for split in ("val_dataloader", "test_dataloader"):
        for a, b in zip(getattr(episodic, split)(), getattr(pretraining, split)(), strict=True):
            for x, y in zip(a.tensors, b.tensors, strict=True):
                assert torch.equal(x, y)


def test_transfer_turns_uint8_into_floats_and_augments_only_in_training():
    dm = labelled()
    images = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1)
    batch = LabelledBatch(images, torch.zeros(8, dtype=torch.long))
    out = dm.on_after_batch_transfer(batch, 0)  # no trainer: not training
    assert isinstance(out, LabelledBatch) and out.images.dtype == torch.float32 and dm.augmented == 0
    torch.testing.assert_close(out.images, images.float() / 255)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.training = True
    dm.trainer = trainer
    out = dm.on_after_batch_transfer(batch, 0)
    assert dm.augmented == 1 and out.images.min() >= 1000


def test_resume_mid_epoch_continues_with_the_remaining_batches():
    dm = labelled()
    full = epoch_of(dm, 0)
    loader = dm.train_dataloader()
    assert isinstance(loader, LabelledLoader) and isinstance(loader, _Stateful)
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = dm.state_dict()
    assert state == {"train": {"epoch": 0, "batches_consumed": 2}}
    resumed = labelled()
    resumed.load_state_dict(state)
    rest = list(resumed.train_dataloader())
    assert len(rest) == len(full) - 2
    for a, b in zip(rest, full[2:], strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_real_bundle_serves_its_training_split(fake_omniglot, tmp_path):
    dm = Omniglot(root=str(fake_omniglot), cache_dir=str(tmp_path), rotations=True, ways=2, queries=3,
                  train_batches="labelled", batch_size=16)  # fmt: skip
    dm.setup("fit")
    data = dm.load_split("train")
    assert dm.num_train_classes == data.num_classes
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch.images.shape == (16, 1, 28, 28) and batch.images.dtype == torch.float32
    for image, label in zip(batch.images, batch.labels, strict=True):
        rows = data.images[data.offsets[label] : data.offsets[label + 1]].float() / 255
        assert (rows == image).flatten(1).all(1).any()  # the image is one of its class's


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="train_batches='batches' must be one of 'episodes', 'labelled'"):
        IdBundle(train_batches="batches")
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        IdBundle(train_batches="labelled", batch_size=0)
    with pytest.raises(ValueError, match="Sinusoid draws its episodes with make_source"):
        Sinusoid(train_batches="labelled")
    with pytest.raises(ValueError, match="no num_train_classes"):
        Sinusoid().num_train_classes  # noqa: B018
    dm = labelled(batch_size=IMAGES, rank=0, world_size=2)
    message = rf"batch_size={IMAGES} but the 'train' split of IdBundle has {IMAGES} images, {IMAGES // 2} per process"
    with pytest.raises(ValueError, match=message + " over 2 processes; lower batch_size"):
        dm.train_dataloader()
