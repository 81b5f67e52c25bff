"""Learn2LearnTasks against real learn2learn TaskDatasets over a small in-memory dataset."""

import os
import random
import subprocess
import sys

import pytest
import torch

from datamodules import Learn2LearnTasks

CLASSES, PER_CLASS = 10, 6


@pytest.fixture(scope="module")
def l2l():
    if os.environ.get("LIGHTNING_META_REQUIRE_L2L"):
        import learn2learn

        return learn2learn
    return pytest.importorskip(
        "learn2learn", reason="the learn2learn extra is not installed (.ci/install-learn2learn.sh)"
    )


def images():
    """``[60, 1, 28, 28]`` uint8: every pixel of example ``i`` of class ``c`` is ``c * PER_CLASS + i``."""
    values = torch.arange(CLASSES * PER_CLASS, dtype=torch.uint8)
    return values.view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous(), torch.arange(CLASSES).repeat_interleave(
        PER_CLASS
    )


def taskset(l2l, ways, samples, num_tasks=-1):
    from learn2learn.data.transforms import ConsecutiveLabels, KShots, LoadData, NWays, RemapLabels

    dataset = l2l.data.MetaDataset(torch.utils.data.TensorDataset(*images()))
    transforms = [NWays(dataset, ways), KShots(dataset, samples), LoadData(dataset), RemapLabels(dataset)]
    return l2l.data.TaskDataset(dataset, transforms + [ConsecutiveLabels(dataset)], num_tasks=num_tasks)


def datamodule(l2l, ways=3, shots=2, queries=2, train_ways=None, **kwargs):
    train = taskset(l2l, train_ways or ways, shots + queries)
    val, test = taskset(l2l, ways, shots + queries), taskset(l2l, ways, shots + queries)
    return Learn2LearnTasks.from_tasksets(
        train, val, test, ways=ways, shots=shots, queries=queries, train_ways=train_ways, **kwargs
    )


def first_batch(dm, split):
    dm.setup({"train": "fit", "val": "validate", "test": "test"}[split])
    return next(iter(getattr(dm, f"{split}_dataloader")()))


# ----------------------------------------------------------------------------- without learn2learn
def test_missing_learn2learn_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # import learn2learn now raises ImportError
    with pytest.raises(
        ImportError,
        match=r'Learn2LearnTasks needs the learn2learn package.*pip install "lightning-meta\[learn2learn\]"',
    ):
        Learn2LearnTasks(benchmark="omniglot")


def test_packages_import_without_learn2learn():
    code = "import sys; sys.modules['learn2learn'] = None; import datamodules, lightning_meta\n"
    code += "print(datamodules.Learn2LearnTasks.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "Learn2LearnTasks"


# ----------------------------------------------------------------------------- with learn2learn
def test_episodes_split_support_and_query_by_class(l2l):
    dm = datamodule(l2l, ways=3, shots=2, queries=2, train_ways=4, tasks_per_batch=5)
    batch = first_batch(dm, "train")
    assert batch.support_x.shape == (5, 8, 1, 28, 28) and batch.query_x.shape == (5, 8, 1, 28, 28)
    assert batch.support_x.dtype == torch.uint8
    assert batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and batch.query_y.tolist()[4] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    for t in range(5):
        support = batch.support_x[t, :, 0, 0, 0].long().view(4, 2)  # example id = class * PER_CLASS + item
        query = batch.query_x[t, :, 0, 0, 0].long().view(4, 2)
        classes = support // PER_CLASS
        assert (classes == classes[:, :1]).all() and (query // PER_CLASS == classes[:, :1]).all()
        assert len(set(classes[:, 0].tolist())) == 4  # distinct classes
        assert not set(support.flatten().tolist()) & set(query.flatten().tolist())  # disjoint examples


def test_validation_episodes_are_fixed_by_the_seed(l2l):
    a, b = first_batch(datamodule(l2l, seed=1), "val"), first_batch(datamodule(l2l, seed=1), "val")
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    c = first_batch(datamodule(l2l, seed=2), "val")
    assert not torch.equal(a.support_x, c.support_x)
    # ... whatever else drew from Python's random in between, and without changing its state.
    random.seed(123)
    expected = random.random()
    random.seed(123)
    first_batch(datamodule(l2l, seed=1), "test")
    assert random.random() == expected


def test_validation_episodes_do_not_depend_on_workers(l2l):
    dm0, dm2 = datamodule(l2l, seed=4, val_episodes=4), datamodule(l2l, seed=4, val_episodes=4, num_workers=2)
    for dm in (dm0, dm2):
        dm.setup("validate")
    plain = [b.support_x for b in dm0.val_dataloader()]
    workers = [b.support_x for b in dm2.val_dataloader()]
    assert len(plain) == 4 and all(torch.equal(x, y) for x, y in zip(plain, workers, strict=True))


def test_training_batches_change_with_the_epoch(l2l):
    dm = datamodule(l2l, seed=0)
    dm.setup("fit")
    stream = dm.streams["train"]
    first = stream.batch(0).support_x
    assert torch.equal(first, stream.batch(0).support_x)
    stream.epoch = 1
    assert not torch.equal(first, stream.batch(0).support_x)


def test_a_taskset_of_the_wrong_shape_is_a_clear_error(l2l):
    dm = Learn2LearnTasks.from_tasksets(
        taskset(l2l, 3, 4), taskset(l2l, 2, 4), taskset(l2l, 3, 4), ways=3, shots=2, queries=2
    )
    with pytest.raises(
        ValueError, match=r"'val' TaskDataset gave a task with 2 classes .* ways=3.*NWays\(dataset, 3\)"
    ):
        first_batch(dm, "val")


def test_arguments_are_checked(l2l):
    with pytest.raises(
        ValueError, match=r"benchmark='omniglott' is not a learn2learn benchmark; use one of .*'omniglot'"
    ):
        Learn2LearnTasks(benchmark="omniglott")
    with pytest.raises(ValueError, match="num_tasks=0 must be -1"):
        Learn2LearnTasks(benchmark="omniglot", num_tasks=0)
    with pytest.raises(
        ValueError, match=r"needs benchmark= .* or TaskDatasets passed with Learn2LearnTasks.from_tasksets"
    ):
        Learn2LearnTasks().setup("validate")


def test_benchmark_is_built_with_our_episode_settings(l2l, monkeypatch):
    calls = []

    def get_tasksets(name, **kwargs):
        calls.append((name, kwargs))
        ways, samples = kwargs["train_ways"], kwargs["train_samples"]
        sets = taskset(l2l, ways, samples), taskset(l2l, kwargs["test_ways"], kwargs["test_samples"])
        return l2l.vision.benchmarks.BenchmarkTasksets(sets[0], sets[1], sets[1])

    monkeypatch.setattr(l2l.vision.benchmarks, "get_tasksets", get_tasksets)
    dm = Learn2LearnTasks(
        benchmark="cifarfs", root="/data/l2l", ways=2, shots=1, queries=3, train_ways=4, train_queries=1
    )
    assert first_batch(dm, "train").support_x.shape[1] == 4 and first_batch(dm, "val").query_x.shape[1] == 6
    name, kwargs = calls[0]
    assert name == "cifarfs" and kwargs["root"] == "/data/l2l" and kwargs["num_tasks"] == -1
    assert (kwargs["train_ways"], kwargs["train_samples"], kwargs["test_ways"], kwargs["test_samples"]) == (4, 2, 2, 4)


def test_protonet_trains_on_learn2learn_tasks(l2l, tmp_path):
    import lightning.pytorch as pl

    from lightning_meta import ProtoNet

    dm = datamodule(l2l, ways=3, shots=1, queries=2, tasks_per_batch=2)
    trainer = pl.Trainer(fast_dev_run=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    model = ProtoNet()
    trainer.fit(model, datamodule=dm)
    assert trainer.state.finished and torch.isfinite(trainer.callback_metrics["train/loss"])
