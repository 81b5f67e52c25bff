"""ProtoNet and MAML training-step time and peak memory per backbone: ours against learn2learn's same network.

Backbones at 84x84 (mini-ImageNet): Conv4 (ProtoNet: Conv4-64, Snell et al.; MAML: Conv4-32, Finn et al.;
learn2learn: ``CNN4Backbone`` / ``MiniImagenetCNN``) and ResNet-12 (64-160-320-640, 640-d average-pooled;
learn2learn: ``ResNet12Backbone`` / ``ResNet12``; DropBlock at 0.1 for ProtoNet, off for MAML, on both sides).
Every row is a full step: ProtoNet embeds support and query, builds prototypes and takes an Adam step;
MAML adapts each task (per-task backward, learn2learn's own recipe) and takes an Adam step. bf16 rows run
under ``torch.autocast("cpu", torch.bfloat16)``, as ``precision="bf16-mixed"`` does. Each row runs in a
fresh subprocess, so its peak memory (max RSS above the RSS before the first step) is its own.

    python benchmarks/backbone_speed.py                           # needs the learn2learn extra for its rows
    python benchmarks/backbone_speed.py --steps 1 --ways 2 --queries 1 --tasks 1 --inner-steps 1   # smoke run
    python benchmarks/backbone_speed.py --backbones resnet12 --methods maml --first-order
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F
from timing import ms_per_step, random_episodes, table_row

BACKBONES = ["conv4", "resnet12"]
METHODS = ["protonet", "maml"]
IMPLS = ["ours", "learn2learn"]
PRECISIONS = ["fp32", "bf16"]
SIZE = 84


def our_backbone(backbone: str, method: str, ways: int) -> torch.nn.Module:
    from lightning_meta.backbones import Conv4, ResNet12

    maml = method == "maml"
    if backbone == "conv4":
        return Conv4(3, 32 if maml else 64, SIZE, ways if maml else None, "max", track_running_stats=not maml)
    return ResNet12(drop_rate=0.0 if maml else 0.1, out_features=ways if maml else None, track_running_stats=not maml)


def reference_backbone(backbone: str, method: str, ways: int) -> torch.nn.Module:
    import learn2learn as l2l

    models = l2l.vision.models
    if method == "maml":
        if backbone == "conv4":
            return models.MiniImagenetCNN(output_size=ways, hidden_size=32)
        return models.ResNet12(output_size=ways, dropblock_dropout=0.0)
    if backbone == "conv4":
        return models.CNN4Backbone(hidden_size=64, layers=4, channels=3, max_pool=True)
    return models.ResNet12Backbone(dropblock_dropout=0.1)


def make_step(args: argparse.Namespace, backbone: str, method: str, impl: str, precision: str):
    torch.manual_seed(0)
    tasks = args.tasks if method == "maml" else 1
    batch = random_episodes(tasks, args.ways, args.shots, args.queries, (3, SIZE, SIZE))
    bf16 = precision == "bf16"
    if impl == "ours":
        from lightning_meta import MAML, EpisodicModule, ProtoNet

        net = our_backbone(backbone, method, args.ways)
        model: EpisodicModule
        if method == "maml":
            model = MAML(net, 0.01, args.inner_steps, args.inner_steps, args.first_order, task_batching="loop")
        else:
            model = ProtoNet(net)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)

        def ours_step() -> None:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model.episode_loss(batch)[0].mean()
            loss.backward()
            optimizer.step()

        return ours_step

    import learn2learn as l2l

    net = reference_backbone(backbone, method, args.ways).train()
    if method == "maml":
        maml = l2l.algorithms.MAML(net, lr=0.01, first_order=args.first_order)
        optimizer = torch.optim.Adam(maml.parameters(), 1e-3)

        def maml_step() -> None:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for t in range(tasks):
                    learner = maml.clone()
                    for _ in range(args.inner_steps):
                        learner.adapt(F.cross_entropy(learner(batch.support_x[t]).float(), batch.support_y[t]))
                    loss = F.cross_entropy(learner(batch.query_x[t]).float(), batch.query_y[t])
                    (loss / tasks).backward()
            optimizer.step()

        return maml_step

    classifier = l2l.nn.PrototypicalClassifier(distance="euclidean")
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    sx, sy, qx, qy = (part[0] for part in batch.tensors)

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            embeddings = net(torch.cat([sx, qx])).float()
            classifier.fit_(embeddings[: len(sx)], sy)
            loss = F.cross_entropy(classifier(embeddings[len(sx) :]), qy)
        loss.backward()
        optimizer.step()

    return step


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(args: argparse.Namespace, backbone: str, method: str, impl: str, precision: str) -> dict:
    step = make_step(args, backbone, method, impl, precision)
    before = rss_mb()
    ms = ms_per_step(step, args.steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {"ms": ms, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--tasks", type=int, default=4, help="MAML's meta-batch (ProtoNet takes one episode)")
    parser.add_argument("--inner-steps", type=int, default=5, help="MAML's inner steps (Finn et al.: 5)")
    parser.add_argument("--first-order", action="store_true", help="FOMAML on both sides")
    parser.add_argument("--backbones", nargs="+", default=BACKBONES, choices=BACKBONES)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--precisions", nargs="+", default=PRECISIONS, choices=PRECISIONS)
    parser.add_argument("--one", nargs=4, metavar=("BACKBONE", "METHOD", "IMPL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args, *args.one)))
        return
    common = ["--steps", str(args.steps), "--ways", str(args.ways), "--shots", str(args.shots)]
    common += ["--queries", str(args.queries), "--tasks", str(args.tasks), "--inner-steps", str(args.inner_steps)]
    common += ["--first-order"] if args.first_order else []
    order = "first" if args.first_order else "second"
    print(
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {SIZE}x{SIZE} px, "
        f"{args.ways}-way {args.shots}-shot {args.queries}-query; MAML: {args.tasks} tasks, {args.inner_steps} "
        f"inner steps, {order} order; median of {args.steps} steps"
    )
    print(table_row(["backbone", "method", "impl", "precision", "ms/step", "vs l2l fp32", "peak MB", "vs l2l fp32"]))
    print(table_row(["---"] * 8))
    for backbone in args.backbones:
        for method in args.methods:
            reference: dict | None = None
            for impl in sorted(args.impls, key=lambda i: i != "learn2learn"):  # learn2learn first: the reference
                for precision in args.precisions:
                    out = subprocess.run(
                        [sys.executable, __file__, *common, "--one", backbone, method, impl, precision],
                        capture_output=True,
                        text=True,
                    )
                    cells = [backbone, method, impl, precision]
                    if out.returncode != 0:
                        lines = out.stderr.strip().splitlines() or ["no output"]
                        print(table_row([*cells, f"failed: {lines[-1]}", "", "", ""]), flush=True)
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    if impl == "learn2learn" and precision == "fp32":
                        reference = r
                    ratio_ms = f"{r['ms'] / reference['ms']:.2f}x" if reference else ""
                    ratio_mb = f"{r['peak_mb'] / max(reference['peak_mb'], 1):.2f}x" if reference else ""
                    print(table_row([*cells, f"{r['ms']:.0f}", ratio_ms, f"{r['peak_mb']:.0f}", ratio_mb]), flush=True)


if __name__ == "__main__":
    main()
