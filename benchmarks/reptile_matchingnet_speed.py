"""Training-step time of Reptile and Matching Networks against the libraries that have them.

learn2learn has no Reptile class: its reference is the plain clone/adapt loop of learn2learn's
``examples/vision/reptile_miniimagenet.py`` (deepcopy the model per task, inner Adam with
beta1 = 0, accumulate ``theta - phi`` into ``.grad``, SGD outer step), here on its ``OmniglotCNN``.
Matching Networks: easyfsl's ``MatchingNetworks`` (always with full context embeddings) against
ours with ``fce=True``, both on the same Conv4-64 (max-pooling) backbone architecture. Same random
Omniglot-sized episodes for every method, fp32 unless the row says bf16 (``torch.autocast`` as
``precision="bf16-mixed"`` does). Prints a markdown table with ratios.

    python benchmarks/reptile_matchingnet_speed.py --steps 5
"""

from __future__ import annotations

import argparse
import copy
import platform

import torch
import torch.nn.functional as F
from timing import ms_per_step, random_episodes, table_row

# Reptile's Omniglot training setting (Nichol et al. 2018): 5-way, 10 shots per class for the inner
# loop, 5 inner Adam steps on batches of 10, meta-batch 5. Matching Networks: 5-way 1-shot and
# 20-way 1-shot with 15 queries per class, one episode per step.
REPTILE = dict(ways=5, shots=10, queries=1, tasks=5, steps=5, batch=10, lr=1e-3)
MATCHING = {"5w1s15q": (5, 1, 15), "20w1s15q": (20, 1, 15)}


def reptile_step(variant: str):
    s = REPTILE
    batch = random_episodes(s["tasks"], s["ways"], s["shots"], s["queries"], (1, 28, 28))
    torch.manual_seed(0)
    if variant.startswith("learn2learn"):
        import learn2learn as l2l

        model = l2l.vision.models.OmniglotCNN(output_size=s["ways"], hidden_size=64)
        outer = torch.optim.SGD(model.parameters(), lr=1.0)
        g = torch.Generator().manual_seed(0)

        def step() -> None:
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            for t in range(s["tasks"]):
                learner = copy.deepcopy(model)
                inner = torch.optim.Adam(learner.parameters(), lr=s["lr"], betas=(0.0, 0.999))
                order = torch.randperm(s["ways"] * s["shots"], generator=g)
                for i in range(s["steps"]):
                    idx = order[(i * s["batch"]) % len(order) :][: s["batch"]]
                    inner.zero_grad()
                    F.cross_entropy(learner(batch.support_x[t, idx]), batch.support_y[t, idx]).backward()
                    inner.step()
                for p, q in zip(model.parameters(), learner.parameters(), strict=True):
                    p.grad.sub_(q.data)
            for p in model.parameters():
                p.grad.mul_(1.0 / s["tasks"]).add_(p.data)
            outer.step()

        return step
    from lightning_meta import ChannelsLast, Conv4, Reptile

    backbone = Conv4(1, 64, 28, s["ways"], pooling="stride", track_running_stats=False)
    mode = "vmap" if "vmap" in variant else "loop"
    ours = Reptile(backbone, s["lr"], s["steps"], inner_batch_size=s["batch"], outer_lr_anneal=False,
                   task_batching=mode)  # fmt: skip
    if "nchw" not in variant:
        ChannelsLast.convert(ours)  # what the Trainer's callback does
    ours.train()
    outer = torch.optim.SGD(ours.parameters(), lr=1.0)
    bf16 = "bf16" in variant

    def step() -> None:
        outer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = ours.episode_loss(batch)[0].mean()
        loss.backward()
        outer.step()

    return step


def matching_step(variant: str, ways: int, shots: int, queries: int):
    batch = random_episodes(1, ways, shots, queries, (1, 28, 28))
    torch.manual_seed(0)
    from lightning_meta import ChannelsLast, Conv4, MatchingNet

    if variant.startswith("easyfsl"):
        from easyfsl.methods import MatchingNetworks

        model = MatchingNetworks(Conv4(1, 64, 28, pooling="max"), feature_dimension=64)
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        sx, sy, qx, qy = (t[0] for t in batch.tensors)

        def step() -> None:
            optimizer.zero_grad()
            model.process_support_set(sx, sy)
            F.nll_loss(model(qx), qy).backward()  # easyfsl returns log-probabilities
            optimizer.step()

        return step
    ours = MatchingNet(Conv4(1, 64, 28, pooling="max"), fce=True).train()
    if "nchw" not in variant:
        ChannelsLast.convert(ours)  # what the Trainer's callback does
    optimizer = torch.optim.Adam(ours.parameters(), 1e-3)
    bf16 = "bf16" in variant

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = ours.episode_loss(batch)[0].mean()
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.steps}")
    print("| algorithm | episode | variant | ms / step | speed vs reference |")
    print("|---|---|---|---|---|")
    rows = [("Reptile", "5w10s, meta-batch 5", v, lambda v=v: reptile_step(v)) for v in
            ("learn2learn loop fp32", "ours loop fp32", "ours loop fp32 nchw", "ours vmap fp32", "ours loop bf16",
             "ours loop bf16 nchw")]  # fmt: skip
    for name, shape in MATCHING.items():
        rows += [("MatchingNet FCE", name, v, lambda v=v, shape=shape: matching_step(v, *shape)) for v in
                 ("easyfsl fp32", "ours fp32", "ours fp32 nchw", "ours bf16", "ours bf16 nchw")]  # fmt: skip
    reference: dict[tuple[str, str], float] = {}
    for algorithm, episode, variant, make in rows:
        ms = ms_per_step(make(), args.steps)
        ref = reference.setdefault((algorithm, episode), ms)
        print(table_row([algorithm, episode, variant, f"{ms:.0f}", f"{ref / ms:.2f}x"]), flush=True)


if __name__ == "__main__":
    main()
