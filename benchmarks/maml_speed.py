"""MAML meta-training speed and peak memory: ours (loop / vmap / batched, fp32 / bf16-mixed) against learn2learn.

Same model weights, same episodes, same settings, one run. Each measurement runs in a fresh
subprocess so its peak memory is its own (CPU: max RSS above the RSS before the first step; GPU:
``torch.cuda.max_memory_allocated``). Prints the CPU's features (AMX or not) and a markdown table
with ratios to learn2learn in the same precision.

    python benchmarks/maml_speed.py                # needs the learn2learn extra
    python benchmarks/maml_speed.py --steps 5 --settings omniglot_5w1s --variants "learn2learn fp32" "ours batched fp32"
    python benchmarks/maml_speed.py --device cuda  # on a GPU
    python benchmarks/maml_speed.py --one omniglot_5w1s "ours batched bf16" second --profile   # top ops of one step

A variant names the implementation (``learn2learn`` or ``ours``), for ours the task batching
(``loop``, ``vmap``, ``batched``), the precision (``fp32`` or ``bf16``, i.e. bf16-mixed autocast)
and optionally ``nhwc`` (channels-last weights and images).
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
VARIANTS = [
    "learn2learn fp32",
    "ours loop fp32",
    "ours vmap fp32",
    "ours batched fp32",
    "learn2learn bf16",
    "ours loop bf16",
    "ours vmap bf16",
    "ours batched bf16",
]


def make_batch(s: dict, device: str = "cpu"):
    batch = random_episodes(s["tasks"], s["ways"], s["shots"], s["queries"], (s["channels"], s["size"], s["size"]))
    return batch._replace(**{k: v.to(device) for k, v in batch._asdict().items() if k != "ways"})


def cpu_features() -> str:
    """The CPU's model and whether it has AMX (bf16 fast) or only AVX-512 bf16 / none (bf16 slow)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    bf16 = "AMX" if "amx_bf16" in flags else "no AMX" + (" (AVX-512 bf16)" if "avx512_bf16" in flags else "")
    return f"{model}, {bf16}"


def reference_model(s: dict):
    import learn2learn as l2l

    if s["pooling"] == "stride":
        return l2l.vision.models.OmniglotCNN(output_size=s["ways"], hidden_size=s["hidden"])
    return l2l.vision.models.MiniImagenetCNN(output_size=s["ways"], hidden_size=s["hidden"])


def run_one(
    setting: str, variant: str, first_order: bool, steps: int, profile: bool = False, device: str = "cpu"
) -> dict:
    s = SETTINGS[setting]
    torch.manual_seed(0)
    batch = make_batch(s, device)
    bf16 = "bf16" in variant.split()
    if variant.startswith("learn2learn"):
        import learn2learn as l2l

        maml = l2l.algorithms.MAML(reference_model(s), lr=s["lr"], first_order=first_order).to(device)
        optimizer = torch.optim.Adam(maml.parameters(), 1e-3)

        def step() -> None:
            # learn2learn's own recipe (examples/vision/maml_omniglot.py): backward per task.
            optimizer.zero_grad()
            for t in range(s["tasks"]):
                learner = maml.clone()
                with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                    for _ in range(s["steps"]):
                        learner.adapt(F.cross_entropy(learner(batch.support_x[t]), batch.support_y[t]))
                    loss = F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t])
                (loss / s["tasks"]).backward()
            optimizer.step()

    else:
        from lightning_meta import MAML, ChannelsLast, Conv4

        backbone = Conv4(s["channels"], s["hidden"], s["size"], s["ways"], s["pooling"], track_running_stats=False)
        mode = next(m for m in ("loop", "vmap", "batched", "auto") if m in variant.split())
        model = MAML(backbone, s["lr"], s["steps"], s["steps"], first_order, task_batching=mode).to(device)
        if "nhwc" in variant.split():
            ChannelsLast.convert(model)  # what the Trainer's callback does
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)

        def step() -> None:
            optimizer.zero_grad()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = model.episode_loss(batch)[0].mean()
            loss.backward()
            optimizer.step()

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    rss_before = _rss_mb()
    step()  # warm-up
    synchronize()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if profile:
        with torch.profiler.profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    elapsed = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
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
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.one:
        setting, variant, order = args.one
        print(json.dumps(run_one(setting, variant, order == "first", args.steps, args.profile, args.device)))
        return
    where = torch.cuda.get_device_name() if args.device == "cuda" else cpu_features()
    print(f"{where}; {torch.get_num_threads()} threads, torch {torch.__version__}, {args.steps} timed steps")
    print("\nRatios are to learn2learn in the same precision (fp32 or bf16-mixed), measured in the same run.\n")
    print("| setting | order | variant | tasks/s | vs l2l | peak MB | vs l2l |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings:
        for order in ("second", "first"):
            results = {}
            for variant in args.variants:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--steps",
                        str(args.steps),
                        "--device",
                        args.device,
                        "--one",
                        setting,
                        variant,
                        order,
                    ],  # fmt: skip
                    capture_output=True,
                    text=True,
                )
                if out.returncode != 0:
                    print(f"| {setting} | {order} | {variant} | failed: {out.stderr.strip().splitlines()[-1]} |||||")
                    continue
                results[variant] = r = json.loads(out.stdout.strip().splitlines()[-1])
                precision = "bf16" if "bf16" in variant.split() else "fp32"
                ref = results.get(f"learn2learn {precision}", r)
                print(
                    f"| {setting} | {order} | {variant} | {r['tasks_per_s']:.1f} | "
                    f"{r['tasks_per_s'] / ref['tasks_per_s']:.2f}x | {r['peak_mb']:.0f} | "
                    f"{r['peak_mb'] / max(ref['peak_mb'], 1):.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
