"""ProtoNet training-step time: ours (fp32, bf16-mixed, channels-last or not) against learn2learn and easyfsl.

Same Conv4-64 (max-pooling) architecture, same random Omniglot-sized episodes, one run; every
method does a full step (embed support and query, prototypes, cross-entropy, backward, Adam step).
learn2learn: its ``CNN4Backbone`` + ``PrototypicalClassifier``; easyfsl: ``PrototypicalNetworks``
over the same learn2learn backbone; both fp32. Ours: ``ProtoNet`` on ``Conv4``, bf16 rows under
``torch.autocast(device, torch.bfloat16)`` as ``precision="bf16-mixed"`` does. ``--device cuda`` puts
every variant's model and batch on the GPU and synchronises before reading the clock.

    python benchmarks/protonet_speed.py --steps 10
    python benchmarks/protonet_speed.py --accuracy_epochs 3 --root ../shared/data/omniglot   # + fp32 vs bf16 run
    python benchmarks/protonet_speed.py --profile 60w5s15q "ours bf16 nchw"                 # top ops of one step
    python benchmarks/protonet_speed.py --device cuda --steps 10                            # on a GPU
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from maml_speed import cpu_features
from timing import ms_per_step, random_episodes, table_row

SHAPES = {"5w5s15q": (5, 5, 15), "60w5s15q": (60, 5, 15)}
VARIANTS = ["learn2learn fp32", "easyfsl fp32", "ours fp32", "ours fp32 nchw", "ours bf16", "ours bf16 nchw"]


def make_step(variant: str, ways: int, shots: int, queries: int, device: str = "cpu"):
    torch.manual_seed(0)
    batch = random_episodes(1, ways, shots, queries, (1, 28, 28))
    batch = batch._replace(**{k: v.to(device) for k, v in batch._asdict().items() if k != "ways"})
    sx, sy, qx, qy = (t[0] for t in batch.tensors)
    if variant.startswith(("learn2learn", "easyfsl")):
        import learn2learn as l2l

        backbone = l2l.vision.models.CNN4Backbone(hidden_size=64, layers=4, channels=1, max_pool=True).to(device)
        optimizer = torch.optim.Adam(backbone.parameters(), 1e-3)
        if variant.startswith("learn2learn"):
            classifier = l2l.nn.PrototypicalClassifier(distance="euclidean")

            def logits() -> torch.Tensor:
                embeddings = backbone(torch.cat([sx, qx]))
                classifier.fit_(embeddings[: len(sx)], sy)
                return classifier(embeddings[len(sx) :])

        else:
            from easyfsl.methods import PrototypicalNetworks

            model = PrototypicalNetworks(backbone)

            def logits() -> torch.Tensor:
                model.process_support_set(sx, sy)
                return model(qx)

        def step() -> None:
            optimizer.zero_grad()
            F.cross_entropy(logits(), qy).backward()
            optimizer.step()
            synchronize(device)

        return step
    from lightning_meta import ChannelsLast, Conv4, ProtoNet

    ours = ProtoNet(Conv4(1, 64, 28, pooling="max")).to(device).train()
    if "nchw" not in variant:
        ChannelsLast.convert(ours)  # what the Trainer's callback does
    optimizer = torch.optim.Adam(ours.parameters(), 1e-3)
    bf16 = "bf16" in variant

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = ours.episode_loss(batch)[0].mean()
        loss.backward()
        optimizer.step()
        synchronize(device)

    return step


def synchronize(device: str) -> None:
    """Wait for the GPU's queued kernels, so that a step's wall time includes them."""
    if device == "cuda":
        torch.cuda.synchronize()


def accuracy(root: str, cache_dir: str | None, epochs: int, test_episodes: int) -> None:
    """Short real-Omniglot runs of configs/protonet/omniglot_5w1s.yaml in fp32 and bf16-mixed."""
    from runs import fit_and_test

    common = ["--data.root", root, "--trainer.enable_progress_bar", "false"]
    common += ["--data.cache_dir", cache_dir] if cache_dir else []
    print("\n| precision | test acc % 5w1s (95% CI) | training (wall) | episodes | test (wall) |")
    print("|---|---|---|---|---|")
    for precision in ("32", "bf16-mixed"):
        args = ["--trainer.max_epochs", str(epochs), "--trainer.precision", precision]
        args += ["--trainer.logger.init_args.save_dir", f"lightning_logs/benchmarks/protonet_{precision}"]
        config = "protonet/omniglot_5w1s.yaml"
        fit_s, steps, results = fit_and_test(config, [config], common + ["--trainer.precision", precision], args,
                                             test_episodes)  # fmt: skip
        m, test_s = results[0]
        print(
            table_row(
                [
                    precision,
                    f"{100 * m['test/acc']:.2f} ± {100 * m['test/acc_ci95']:.2f}",
                    f"{fit_s / 60:.1f} min",
                    str(steps),
                    f"{test_s:.0f} s",
                ]
            ),  # fmt: skip
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--accuracy_epochs", type=int, default=0, help="also train fp32 and bf16 this many epochs")
    parser.add_argument("--root", default="../shared/data/omniglot")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--test_episodes", type=int, default=1000)
    parser.add_argument("--profile", nargs=2, metavar=("SHAPE", "VARIANT"), help="print the top ops of one step")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False; use --device cpu")
    if args.profile:
        step = make_step(args.profile[1], *SHAPES[args.profile[0]], args.device)
        step()
        with torch.profiler.profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()}, {cpu_features()}"
    print(f"{where}; {torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.steps}")
    print("| episode | variant | ms / step | speed vs learn2learn fp32 |")
    print("|---|---|---|---|")
    for name in args.shapes:
        reference = None
        for variant in args.variants:
            try:
                step = make_step(variant, *SHAPES[name], args.device)
            except ImportError as error:  # learn2learn / easyfsl not installed: say so, time the others
                print(table_row([name, variant, f"not run: {error}", ""]), flush=True)
                continue
            ms = ms_per_step(step, args.steps)
            reference = ms if variant == "learn2learn fp32" else reference
            ratio = f"{reference / ms:.2f}x" if reference else "no learn2learn run"
            print(table_row([name, variant, f"{ms:.1f}", ratio]), flush=True)
    if args.accuracy_epochs:
        accuracy(args.root, args.cache_dir, args.accuracy_epochs, args.test_episodes)


if __name__ == "__main__":
    main()
