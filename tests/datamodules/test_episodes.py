import pytest
import torch
from torch.utils.data import DataLoader

from datamodules import (
    ClassEpisodeSampler,
    ClassImages,
    EpisodeBatch,
    EpisodeStream,
    Omniglot,
    as_episode_batch,
)


def id_images(counts: list[int]) -> ClassImages:
    """Each 'image' is a 1x1x1 tensor holding its own global index, so episodes can be traced back."""
    total = sum(counts)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    return ClassImages(torch.arange(total).view(total, 1, 1, 1), offsets, [f"c{i}" for i in range(len(counts))])


def class_of(index: torch.Tensor, data: ClassImages) -> torch.Tensor:
    return torch.searchsorted(data.offsets, index, right=True) - 1


def test_shapes_labels_and_disjoint_support_query():
    data = id_images([20] * 30)
    sampler = ClassEpisodeSampler(data, ways=5, shots=3, queries=4)
    batch = sampler.sample(8, torch.Generator().manual_seed(0))
    assert isinstance(batch, EpisodeBatch)
    assert batch.support_x.shape == (8, 15, 1, 1, 1) and batch.query_x.shape == (8, 20, 1, 1, 1)
    assert batch.support_y.shape == (8, 15) and batch.query_y.shape == (8, 20)
    assert batch.support_y.min() == 0 and batch.support_y.max() == 4
    for t in range(8):
        s, q = batch.support_x[t].flatten(), batch.query_x[t].flatten()
        assert set(s.tolist()).isdisjoint(q.tolist())
        assert len(set(s.tolist()) | set(q.tolist())) == 35
        s_cls, q_cls = class_of(s, data), class_of(q, data)
        # Same label <=> same class, and five distinct classes.
        for label in range(5):
            assert s_cls[batch.support_y[t] == label].unique().numel() == 1
            assert (q_cls[batch.query_y[t] == label] == s_cls[batch.support_y[t] == label][0]).all()
        assert s_cls.unique().numel() == 5


def test_every_class_used_and_uneven_classes_respected():
    counts = [3, 7, 5, 20, 4, 9]
    data = id_images(counts)
    sampler = ClassEpisodeSampler(data, ways=3, shots=1, queries=2)
    batch = sampler.sample(400, torch.Generator().manual_seed(1))
    idx = torch.cat([batch.support_x.flatten(), batch.query_x.flatten()])
    assert idx.max() < sum(counts)
    assert class_of(idx, data).unique().tolist() == list(range(len(counts)))
    # Distinct images within each class of each episode, even for the 3-image class.
    per_class = torch.cat([batch.support_x.view(400, 3, 1), batch.query_x.view(400, 3, 2)], dim=2)
    assert all(row.unique().numel() == 3 for row in per_class.view(-1, 3))


def stream(split, tasks_per_batch=4, rank=0, world=1, episodes=22, seed=0, data=None):
    data = data or id_images([20] * 12)
    return EpisodeStream(ClassEpisodeSampler(data, 5, 1, 2), split, episodes, tasks_per_batch, seed, rank, world)


def episodes_of(batches):
    return [
        tuple(b.support_x[t].flatten().tolist() + b.query_x[t].flatten().tolist())
        for b in batches
        for t in range(b.num_tasks)
    ]


def test_eval_episodes_fixed_by_seed_across_batching_ranks_and_workers():
    reference = episodes_of(stream("val", tasks_per_batch=1))
    assert len(reference) == 22
    assert episodes_of(stream("val", tasks_per_batch=4)) == reference
    # Two ranks: disjoint shares that together are exactly the single-process episodes.
    shares = [episodes_of(stream("val", rank=r, world=2)) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(reference)
    assert len(shares[0]) + len(shares[1]) == 22
    # Three ranks and two DataLoader workers per rank give the same set again.
    loaded = []
    for r in range(3):
        loader = DataLoader(stream("val", rank=r, world=3), batch_size=None, num_workers=2)
        loaded += episodes_of(list(loader))
    assert sorted(loaded) == sorted(reference)
    assert episodes_of(stream("val", seed=1)) != reference
    assert episodes_of(stream("test")) != reference


def test_train_episodes_differ_per_rank_and_epoch_and_are_reproducible():
    a, b = stream("train", rank=0, world=2), stream("train", rank=1, world=2)
    assert len(a) == len(b) == 3  # ceil(22 / (4 * 2))
    assert set(episodes_of(a)).isdisjoint(episodes_of(b))
    assert episodes_of(a) == episodes_of(stream("train", rank=0, world=2))
    a.epoch = 1
    assert episodes_of(a) != episodes_of(stream("train", rank=0, world=2))
    # The stream does not depend on the number of workers.
    loader = DataLoader(stream("train"), batch_size=None, num_workers=2)
    assert episodes_of(list(loader)) == episodes_of(stream("train"))


@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_train_stream_start_skips_batches_and_keeps_the_rest_in_order(num_workers):
    whole = stream("train", episodes=40)
    expected = episodes_of([whole.batch(j) for j in range(3, len(whole))])
    resumed = stream("train", episodes=40)
    resumed.start = 3
    assert len(resumed) == len(whole) == 10
    assert episodes_of(DataLoader(resumed, batch_size=None, num_workers=num_workers)) == expected


def test_plain_tuple_accepted_and_bad_batch_rejected():
    t = (torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1, 3))
    assert as_episode_batch(t).query_x.shape == (1, 3)
    with pytest.raises(TypeError, match="4-tuple"):
        as_episode_batch(t[:3])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ways": 0}, "ways=0"),
        ({"shots": -1}, "shots=-1"),
        ({"tasks_per_batch": 0}, "tasks_per_batch=0"),
        ({"train_ways": 0}, "train_ways=0"),
        ({"num_workers": -1}, "num_workers=-1"),
    ],
)
def test_bad_episode_parameters_rejected(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        Omniglot(root=str(tmp_path), **kwargs)


def test_batches_carry_their_ways_through_collate_pinning_and_transfer() -> None:
    """The sampler says how many classes its episodes have, and every step after it keeps that."""
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from torch.utils.data._utils.collate import default_convert

    from datamodules.episodes import collate_episodes, episode_ways

    data = ClassImages.from_equal_classes(torch.zeros(10, 6, 1, 4, 4, dtype=torch.uint8), [str(i) for i in range(10)])
    batch = ClassEpisodeSampler(data, ways=4, shots=2, queries=1).sample(3, torch.Generator().manual_seed(0))
    assert batch.ways == 4 and batch.task == "classification"
    assert collate_episodes([batch, batch]).ways == 4
    assert default_convert(batch).ways == 4
    assert move_data_to_device(batch, "cpu").ways == 4
    # A batch built by hand without ways: counted once from its labels.
    assert episode_ways(EpisodeBatch(*batch.tensors)) == 4
    assert EpisodeBatch(*batch.tensors).ways is None
