"""ANIL and MAML++ meta-training speed against MAML (head only and full) and learn2learn's ANIL and MAML.

Same body, same random episodes, second order, one meta-training step (forward, meta-gradient,
Adam) timed after a warm-up, in fp32 and under bf16 autocast; and one evaluation step (adaptation
with the evaluation's inner steps, no meta-gradient; ours only). ANIL runs the body once per task;
``MAML(adapt="head")`` computes the same meta-gradient but runs the body at every inner step (with
one inner step, as on Omniglot in training, both run it twice per task); full MAML adapts every
weight; MAML++ (``MAMLPlusPlus`` with all of the paper's switches on: multi-step loss, per-step
batch norm, per-layer per-step learned inner rates, second order) is full MAML plus its extras.
learn2learn's rows (when it is installed) follow its examples: ``anil_fc100.py`` for ANIL,
``maml_omniglot.py`` for MAML (one backward per task). Prints a markdown table with the CPU's AMX
flags (bf16 matrix units) from ``/proc/cpuinfo``.

    python benchmarks/anil_speed.py                                  # the real measurement (idle machine)
    python benchmarks/anil_speed.py --steps 1 --tasks 2 --settings omniglot_5w1s   # smoke run
"""

from __future__ import annotations

import argparse
import itertools
import platform
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import ms_per_step, random_episodes, table_row
from torch import nn

from lightning_meta import ANIL, MAML, Conv4, MAMLPlusPlus

# fmt: off
SETTINGS = {
    # Finn et al. 2017's Omniglot setting: Conv4-64 with stride-2 convolutions, 1 inner step (3 at test), 32 tasks.
    "omniglot_5w1s": dict(ways=5, shots=1, queries=15, tasks=32, steps=1, eval_steps=3, lr=0.4, size=28, channels=1,
                          hidden=64, pooling="stride"),
    # mini-ImageNet-shaped episodes (84x84 RGB): Conv4-32 with max-pooling, 5 inner steps (10 at test), 4 tasks.
    "miniimagenet_5w1s": dict(ways=5, shots=1, queries=15, tasks=4, steps=5, eval_steps=10, lr=0.01, size=84,
                              channels=3, hidden=32, pooling="max"),
}
# fmt: on
METHODS = ["ANIL", "MAML adapt=head", "MAML", "MAML++", "learn2learn ANIL", "learn2learn MAML"]


def amx_flags() -> str:
    """The AMX flags of the first CPU in /proc/cpuinfo, or 'none'."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    found = sorted(f for f in flags if f.startswith("amx"))
    return " ".join(found) if found else "none"


def full_network(s: dict) -> Conv4:
    """The setting's Conv4 with its own classifier, as full MAML, MAML++ and learn2learn's MAML adapt it."""
    return Conv4(s["channels"], s["hidden"], s["size"], s["ways"], s["pooling"], track_running_stats=False)


def make_step(method: str, s: dict, bf16: bool, device: torch.device, train: bool = True) -> Callable[[], None]:
    torch.manual_seed(0)
    batch = random_episodes(s["tasks"], s["ways"], s["shots"], s["queries"], (s["channels"], s["size"], s["size"]))
    batch = batch._replace(**{k: v.to(device) for k, v in batch._asdict().items() if k != "ways"})
    body = Conv4(s["channels"], s["hidden"], s["size"], None, s["pooling"], track_running_stats=False)
    head = nn.Linear(body.embedding_dim, s["ways"])
    if method == "learn2learn ANIL":
        import learn2learn as l2l

        body, maml_head = body.to(device), l2l.algorithms.MAML(head.to(device), lr=s["lr"])
        optimizer = torch.optim.Adam([*body.parameters(), *maml_head.parameters()], 1e-3)
        shots_total = batch.support_x.shape[1]

        def step() -> None:  # learn2learn's examples/vision/anil_fc100.py: body once per task, backward per task
            optimizer.zero_grad()
            for t in range(s["tasks"]):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    learner = maml_head.clone()
                    features = body(torch.cat([batch.support_x[t], batch.query_x[t]]))
                    for _ in range(s["steps"]):
                        learner.adapt(F.cross_entropy(learner(features[:shots_total]), batch.support_y[t]))
                    loss = F.cross_entropy(learner(features[shots_total:]), batch.query_y[t]) / s["tasks"]
                loss.backward()
            optimizer.step()

        return step
    if method == "learn2learn MAML":
        import learn2learn as l2l

        maml = l2l.algorithms.MAML(full_network(s).to(device), lr=s["lr"])
        optimizer = torch.optim.Adam(maml.parameters(), 1e-3)

        def step() -> None:  # learn2learn's examples/vision/maml_omniglot.py: backward per task
            optimizer.zero_grad()
            for t in range(s["tasks"]):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    learner = maml.clone()
                    for _ in range(s["steps"]):
                        learner.adapt(F.cross_entropy(learner(batch.support_x[t]), batch.support_y[t]))
                    loss = F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t]) / s["tasks"]
                loss.backward()
            optimizer.step()

        return step
    steps = (s["lr"], s["steps"], s["eval_steps"])
    if method == "ANIL":
        model: nn.Module = ANIL(body, head, *steps)
    elif method == "MAML adapt=head":
        model = MAML(body, *steps, head=head, adapt="head", task_batching="loop")
    elif method == "MAML++":
        model = MAMLPlusPlus(full_network(s), *steps, first_order_epochs=0, task_batching="loop")
    else:
        model = MAML(full_network(s), *steps, task_batching="loop")
    model = model.to(device).train(train)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def evaluate() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model.episode_loss(batch).loss.sum().item()

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.episode_loss(batch).loss.mean()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step if train else evaluate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5, help="timed meta-training steps (the median is reported)")
    parser.add_argument("--tasks", type=int, default=None, help="override the meta-batch size of every setting")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    methods = list(args.methods)
    try:
        import learn2learn  # noqa: F401
    except ImportError:
        methods = [m for m in methods if not m.startswith("learn2learn")]
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {device}, "
          f"CPU AMX flags: {amx_flags()}, median of {args.steps} steps, second order\n")  # fmt: skip
    print(table_row(["setting", "phase", "precision", "method", "ms/step", "tasks/s", "tasks/s vs ANIL"]))
    print(table_row(["---"] * 7))
    for name in args.settings:
        s = dict(SETTINGS[name])
        if args.tasks:
            s["tasks"] = args.tasks
        for phase, precision in itertools.product(("train", "eval"), ("fp32", "bf16")):
            anil_ms = None
            for method in methods:
                if phase == "eval" and method.startswith("learn2learn"):
                    continue
                ms = ms_per_step(make_step(method, s, precision == "bf16", device, phase == "train"), args.steps)
                anil_ms = ms if method == "ANIL" else anil_ms
                ratio = f"{anil_ms / ms:.2f}x" if anil_ms else "-"
                cells = [name, phase, precision, method, f"{ms:.1f}", f"{1000 * s['tasks'] / ms:.1f}", ratio]
                print(table_row(cells), flush=True)


if __name__ == "__main__":
    main()
