"""MAML meta-training speed and peak memory: ours (loop / vmap, fp32 / bf16-mixed) against learn2learn's MAML.

Same model weights, same episodes, same settings, one run. Each measurement runs in a fresh
subprocess so its peak resident memory (max RSS above the RSS before the first step) is its own.
Prints a markdown table with ratios to learn2learn fp32.

    python benchmarks/maml_speed.py                # needs the learn2learn extra
    python benchmarks/maml_speed.py --steps 5 --settings omniglot_5w1s --variants "learn2learn fp32" "ours loop bf16"
    python benchmarks/maml_speed.py --one omniglot_5w1s "ours loop bf16" second --profile   # top ops of one step
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from timing import random_episodes

SETTINGS = {
    # The MAML paper's Omniglot setting (learn2learn's OmniglotCNN): 64 filters, stride-2 convs.
    "omniglot_5w1s": dict(
        ways=5, shots=1, queries=15, tasks=32, steps=1, lr=0.4, size=28, channels=1, hidden=64, pooling="stride"
    ),
    # mini-ImageNet (learn2learn's MiniImagenetCNN): Conv4-32 with max-pooling, 84x84.
    "miniimagenet_5w1s": dict(
        ways=5, shots=1, queries=15, tasks=4, steps=5, lr=0.01, size=84, channels=3, hidden=32, pooling="max"
    ),
}
# "nchw": our Conv4 fed contiguous (channels-first) tensors instead of channels-last, its default.
VARIANTS = [
    "learn2learn fp32",
    "ours loop fp32",
    "ours loop fp32 nchw",
    "ours vmap fp32",
    "ours loop bf16",
    "ours loop bf16 nchw",
    "ours vmap bf16",
]


def make_batch(s: dict):
    return random_episodes(s["tasks"], s["ways"], s["shots"], s["queries"], (s["channels"], s["size"], s["size"]))


def reference_model(s: dict):
    import learn2learn as l2l

    if s["pooling"] == "stride":
        return l2l.vision.models.OmniglotCNN(output_size=s["ways"], hidden_size=s["hidden"])
    return l2l.vision.models.MiniImagenetCNN(output_size=s["ways"], hidden_size=s["hidden"])


def run_one(setting: str, variant: str, first_order: bool, steps: int, profile: bool = False) -> dict:
    s = SETTINGS[setting]
    torch.manual_seed(0)
    batch = make_batch(s)
    if variant.startswith("learn2learn"):
        import learn2learn as l2l

        maml = l2l.algorithms.MAML(reference_model(s), lr=s["lr"], first_order=first_order)
        optimizer = torch.optim.Adam(maml.parameters(), 1e-3)

        def step() -> None:
            # learn2learn's own recipe (examples/vision/maml_omniglot.py): backward per task.
            optimizer.zero_grad()
            for t in range(s["tasks"]):
                learner = maml.clone()
                for _ in range(s["steps"]):
                    learner.adapt(F.cross_entropy(learner(batch.support_x[t]), batch.support_y[t]))
                loss = F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t])
                (loss / s["tasks"]).backward()
            optimizer.step()

    else:
        from lightning_meta import MAML, Conv4

        backbone = Conv4(s["channels"], s["hidden"], s["size"], s["ways"], s["pooling"], track_running_stats=False)
        mode = "vmap" if "vmap" in variant else "loop"
        nhwc = "nchw" not in variant
        model = MAML(backbone, s["lr"], s["steps"], s["steps"], first_order, task_batching=mode, channels_last=nhwc)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        bf16 = "bf16" in variant

        def step() -> None:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model.episode_loss(batch)[0].mean()
            loss.backward()
            optimizer.step()

    rss_before = _rss_mb()
    step()  # warm-up
    if profile:
        with torch.profiler.profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return {"tasks_per_s": steps * s["tasks"] / elapsed, "peak_mb": peak}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--one", nargs=3, metavar=("SETTING", "VARIANT", "ORDER"))
    parser.add_argument("--profile", action="store_true", help="with --one: print the top ops of one step")
    args = parser.parse_args()
    if args.one:
        setting, variant, order = args.one
        print(json.dumps(run_one(setting, variant, order == "first", args.steps, args.profile)))
        return
    print(
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.steps} timed steps"
    )
    print("| setting | order | variant | tasks/s | vs l2l | peak MB | vs l2l |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings:
        for order in ("second", "first"):
            results = {}
            for variant in args.variants:
                out = subprocess.run(
                    [sys.executable, __file__, "--steps", str(args.steps), "--one", setting, variant, order],
                    capture_output=True,
                    text=True,
                )
                if out.returncode != 0:
                    print(f"| {setting} | {order} | {variant} | failed: {out.stderr.strip().splitlines()[-1]} |||||")
                    continue
                results[variant] = r = json.loads(out.stdout.strip().splitlines()[-1])
                ref = results.get("learn2learn fp32", r)
                print(
                    f"| {setting} | {order} | {variant} | {r['tasks_per_s']:.1f} | "
                    f"{r['tasks_per_s'] / ref['tasks_per_s']:.2f}x | {r['peak_mb']:.0f} | "
                    f"{r['peak_mb'] / max(ref['peak_mb'], 1):.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
