"""Our MAML meta-gradient against learn2learn's MAML (the reference), on the same weights and episodes."""

import os

import pytest
import torch
import torch.nn.functional as F
from episode_factory import make_episodes

from lightning_meta import MAML, ChannelsLast, Conv4

if os.environ.get("LIGHTNING_META_REQUIRE_L2L"):
    import learn2learn as l2l
else:
    l2l = pytest.importorskip(
        "learn2learn", reason="the learn2learn extra is not installed (.ci/install-learn2learn.sh)"
    )


def paired_models(dtype):
    torch.manual_seed(0)
    reference = l2l.vision.models.OmniglotCNN(output_size=5).to(dtype)
    ours = Conv4(pooling="stride", out_features=5, track_running_stats=False).to(dtype)
    with torch.no_grad():
        for i in range(4):
            conv, norm = ours.features[3 * i], ours.features[3 * i + 1]
            conv.weight.copy_(reference.base[i].conv.weight)
            conv.bias.copy_(reference.base[i].conv.bias)
            norm.weight.copy_(reference.base[i].normalize.weight)
            norm.bias.copy_(reference.base[i].normalize.bias)
        ours.head.weight.copy_(reference.classifier.weight)
        ours.head.bias.copy_(reference.classifier.bias)
    return ours, reference


def flat_grads(modules):
    return torch.cat([p.grad.flatten() for m in modules for p in m.parameters(recurse=False)])


def layers(ours, reference):
    """Matching parameter holders, in the same order."""
    mine = [m for i in range(4) for m in (ours.features[3 * i], ours.features[3 * i + 1])] + [ours.head]
    theirs = [m for i in range(4) for m in (reference.base[i].conv, reference.base[i].normalize)] + [
        reference.classifier
    ]
    return mine, theirs


def episodes(dtype, tasks=4, ways=5, shots=1, queries=3):
    return make_episodes(tasks, ways, shots, queries, (1, 28, 28), seed=1, dtype=dtype, draw=torch.rand)


def learn2learn_gradient(batch, dtype, steps, first_order):
    ours, reference = paired_models(dtype)
    maml = l2l.algorithms.MAML(reference, lr=0.4, first_order=first_order)
    for t in range(batch.num_tasks):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(batch.support_x[t]), batch.support_y[t]))
        (F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t]) / batch.num_tasks).backward()
    return flat_grads(layers(ours, reference)[1]).double()


def our_gradient(batch, dtype, steps, first_order, task_batching, channels_last):
    ours, reference = paired_models(dtype)
    model = MAML(ours, inner_lr=0.4, inner_steps=steps, first_order=first_order, task_batching=task_batching)
    if channels_last:
        ChannelsLast.convert(model)  # what the Trainer's callback does
    model.episode_loss(batch)[0].mean().backward()
    return flat_grads(layers(ours, reference)[0]).double()


# float32: the loop uses F.batch_norm like learn2learn and is compared with learn2learn in float32.
# vmap needs a var_mean batch norm whose float32 rounding differs; after 3 inner steps learn2learn's
# own float32 gradient is 2e-3 from the float64 one, so vmap float32 is compared with float64.
# For the same reason the float32 comparisons use channels-first tensors, learn2learn's convolution
# kernels; channels-last (the default) is checked in float64, where rounding does not hide a mistake.
@pytest.mark.parametrize(
    "dtype, task_batching, reference_dtype, tolerance, channels_last",
    [
        (torch.float64, "loop", torch.float64, 1e-5, True),
        (torch.float64, "vmap", torch.float64, 1e-5, True),
        (torch.float64, "loop", torch.float64, 1e-5, False),
        (torch.float32, "loop", torch.float32, 1e-4, False),
        (torch.float32, "vmap", torch.float64, 5e-4, False),
    ],
)
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_equals_learn2learn(
    dtype, task_batching, reference_dtype, tolerance, channels_last, first_order, steps
):
    expected = learn2learn_gradient(episodes(reference_dtype), reference_dtype, steps, first_order)
    got = our_gradient(episodes(dtype), dtype, steps, first_order, task_batching, channels_last)
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < tolerance, relative
