"""Episode sampling speed: our vectorised sampler against learn2learn's TaskDataset, on the same data.

5-way 5-shot 15-query episodes from random uint8 caches the size of Omniglot's training split
(1028 classes x 20 x 1x28x28, Vinyals et al.) and mini-ImageNet's (64 x 600 x 3x84x84, Ravi and
Larochelle), in one run:

- ours: ``ClassEpisodeSampler.sample`` directly, and the datamodule's ``train_dataloader`` with 0
  and 2 DataLoader workers at 1 and 16 tasks per batch;
- learn2learn: a ``TaskDataset`` with ``NWays, KShots, LoadData, RemapLabels, ConsecutiveLabels``
  over an ``l2l.data.MetaDataset`` of a ``TensorDataset`` of the same tensors, called directly
  and through a DataLoader with 0 and 2 workers; and the same TaskDataset behind our
  ``Learn2LearnTasks`` (which also splits support and query);
- one ProtoNet training step (Conv4-64, Adam, fp32 and bf16 autocast) on a 1-task batch of the
  same episode shape, as episodes per second, to show whether sampling can be the bottleneck.

Rates are episodes (tasks) per second; ratios are to learn2learn's direct ``sample()``. Each row is
measured in a fresh Python process (``--same_process`` to turn that off). Prints a markdown table.

    python benchmarks/sampling_speed.py                          # ~3 s a row: a few minutes
    python benchmarks/sampling_speed.py --seconds 0.2 --per_class 30 --workers 0   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from datamodules import ClassEpisodeSampler, ClassImages, EpisodicDataModule, Learn2LearnTasks

WAYS, SHOTS, QUERIES = 5, 5, 15
SHAPES = {  # classes, images per class, channels, side
    "omniglot": (1028, 20, 1, 28),
    "mini-imagenet": (64, 600, 3, 84),
}


class InMemory(EpisodicDataModule):
    """The same class-indexed uint8 cache for every split."""

    def __init__(self, data: ClassImages, tasks_per_batch: int, num_workers: int) -> None:
        super().__init__(WAYS, SHOTS, QUERIES, tasks_per_batch, train_episodes=10**6, num_workers=num_workers)
        self.data = data

    def load_split(self, split: str) -> ClassImages:
        return self.data


class Forever(Dataset):
    """learn2learn's ``TaskDataset.sample()`` as a map-style dataset, for a DataLoader with workers."""

    def __init__(self, tasks: Any) -> None:
        self.tasks = tasks

    def __len__(self) -> int:
        return 10**6

    def __getitem__(self, index: int) -> Any:
        return self.tasks.sample()


def rate(
    batches: Callable[[], Iterator[Any]],
    tasks_per_batch: int,
    seconds: float,
    warmup: int = 3,
    warmup_seconds: float = 1.0,
) -> float:
    """Episodes per second over ``seconds`` of iteration, after a warm-up.

    The warm-up is ``warmup`` batches (workers started) and at least ``warmup_seconds``: glibc's
    malloc serves the first large blocks with fresh pages and only raises its mmap threshold as
    they are freed, so the page faults of the first few dozen multi-MB batches are not the steady state.
    """
    iterator = batches()
    start = time.perf_counter()
    for _ in range(warmup):
        next(iterator)
    while time.perf_counter() - start < warmup_seconds:
        next(iterator)
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count == 0:
        next(iterator)
        count += 1
    del iterator  # stops DataLoader workers
    return count * tasks_per_batch / elapsed


def epochs(loader: Callable[[], Any]) -> Callable[[], Iterator[Any]]:
    """Batches of ``loader()`` epoch after epoch, so a short epoch does not end the measurement."""

    def batches() -> Iterator[Any]:
        while True:
            yield from loader()

    return batches


def repeat(call: Callable[[], Any]) -> Callable[[], Iterator[Any]]:
    def batches() -> Iterator[Any]:
        while True:
            yield call()

    return batches


def l2l_taskset(images: torch.Tensor, labels: torch.Tensor) -> Any:
    import learn2learn as l2l
    from learn2learn.data.transforms import ConsecutiveLabels, KShots, LoadData, NWays, RemapLabels

    dataset = l2l.data.MetaDataset(TensorDataset(images, labels))
    transforms = [
        NWays(dataset, WAYS),
        KShots(dataset, SHOTS + QUERIES),
        LoadData(dataset),
        RemapLabels(dataset),
        ConsecutiveLabels(dataset),
    ]
    return l2l.data.TaskDataset(dataset, transforms, num_tasks=-1)


def protonet_step_rate(sampler: ClassEpisodeSampler, channels: int, side: int, bf16: bool, seconds: float) -> float:
    from lightning_meta import Conv4, ProtoNet

    model = ProtoNet(backbone=Conv4(in_channels=channels, hidden=64, image_size=side))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    raw = sampler.sample(1, torch.Generator().manual_seed(0))
    batch = type(raw)(raw.support_x.float() / 255, raw.support_y, raw.query_x.float() / 255, raw.query_y)

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.episode_loss(batch)
        loss.mean().backward()
        optimizer.step()

    return rate(repeat(step), 1, seconds, warmup=2)


def rows_of(name: str, args: argparse.Namespace) -> list[tuple[str, Callable[[], float]]]:
    """The table's rows for dataset ``name``: a label and a function that measures the rate."""
    classes, per_class, channels, side = SHAPES[name]
    per_class = min(per_class, args.per_class or per_class)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, channels, side, side), dtype=torch.uint8, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)
    data = ClassImages.from_equal_classes(
        images.view(classes, per_class, channels, side, side), list(map(str, range(classes)))
    )
    sampler = ClassEpisodeSampler(data, WAYS, SHOTS, QUERIES)

    def taskset() -> Any:
        random.seed(0)
        return l2l_taskset(images, labels)

    def ours(tasks: int, workers: int) -> float:
        dm = InMemory(data, tasks, workers)
        dm.setup("fit")
        return rate(lambda: iter(dm.train_dataloader()), tasks, args.seconds)

    def l2l_loader(workers: int) -> float:
        loader = DataLoader(Forever(taskset()), batch_size=None, num_workers=workers)
        return rate(lambda: iter(loader), 1, args.seconds)

    def l2l_wrapped() -> float:
        tasks = taskset()
        wrapped = Learn2LearnTasks.from_tasksets(tasks, tasks, tasks, ways=WAYS, shots=SHOTS, queries=QUERIES)
        wrapped.setup("fit")
        return rate(epochs(wrapped.train_dataloader), 1, args.seconds)

    rows: list[tuple[str, Callable[[], float]]] = [
        ("ours: ClassEpisodeSampler.sample(1)", lambda: rate(repeat(lambda: sampler.sample(1, g)), 1, args.seconds))
    ]
    for tasks in args.tasks_per_batch:
        for workers in args.workers:
            label = f"ours: train_dataloader, {tasks} tasks/batch, {workers} workers"
            rows.append((label, lambda tasks=tasks, workers=workers: ours(tasks, workers)))
    rows.append(("learn2learn: TaskDataset.sample()", lambda: rate(repeat(taskset().sample), 1, args.seconds)))
    for workers in args.workers:
        rows.append((f"learn2learn: DataLoader, {workers} workers", lambda workers=workers: l2l_loader(workers)))
    rows.append(("learn2learn via Learn2LearnTasks, 0 workers", l2l_wrapped))
    for bf16 in (False, True):
        label = f"ProtoNet Conv4-64 training step, {'bf16 autocast' if bf16 else 'fp32'}"
        rows.append((label, lambda bf16=bf16: protonet_step_rate(sampler, channels, side, bf16, args.step_seconds)))
    return rows


def run(name: str, args: argparse.Namespace, argv: list[str]) -> list[tuple[str, float]]:
    """Measure every row of dataset ``name``, each in a fresh Python process unless ``--same_process``.

    A fresh process per row keeps one measurement from changing the next: the memory allocator's
    state after multi-MB batches or forked workers changed later rows by up to 3x in one process.
    """
    if args.same_process:
        return [(label, measure()) for label, measure in rows_of(name, args)]
    count = len(rows_of(name, argparse.Namespace(**{**vars(args), "per_class": 1})))
    results = []
    for i in range(count):
        # The later --datasets overrides any in argv.
        command = [sys.executable, __file__, *argv, "--datasets", name, "--row", str(i)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        label, value = json.loads(out)
        print(f"  {name}: {label}: {number(value)}", file=sys.stderr, flush=True)
        results.append((label, value))
    return results


def number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per sampling row")
    parser.add_argument("--step_seconds", type=float, default=5.0, help="measuring time per ProtoNet row")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--tasks_per_batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--per_class", type=int, default=None, help="at most this many images per class (smoke runs)")
    parser.add_argument("--datasets", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--same_process", action="store_true", help="measure all rows in this process")
    parser.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)  # one row, for run()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*TaskDataset is deprecated.*")
    if args.row is not None:  # a child process of run(): print one row as JSON
        label, measure = rows_of(args.datasets[0], args)[args.row]
        print(json.dumps([label, measure()]))
        return
    print(f"{WAYS}-way {SHOTS}-shot {QUERIES}-query episodes, episodes/s (ratio to learn2learn's sample())")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"--seconds {args.seconds} --step_seconds {args.step_seconds} --per_class {args.per_class}\n")
    results = {name: run(name, args, argv) for name in args.datasets}
    print("| | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    baselines = {name: dict(rows)["learn2learn: TaskDataset.sample()"] for name, rows in results.items()}
    for i, (label, _) in enumerate(next(iter(results.values()))):
        cells = [f"{number(rows[i][1])} ({rows[i][1] / baselines[name]:.2g}x)" for name, rows in results.items()]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
