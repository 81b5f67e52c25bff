"""Task-batched layers (``task_batching="batched"``): the same results as one task at a time."""

import pytest
import torch
from episode_factory import make_episodes
from torch import nn
from torch.func import functional_call

from lightning_meta import MAML, MLP, Conv4, MetaSGD, ResNet12
from lightning_meta.task_batched import TaskBatched, TaskBatchingError, check_task_batchable, expand_tasks


def image_batch(tasks=3, queries=2, channels=1, size=28, dtype=torch.float64):
    return make_episodes(tasks, 5, 1, queries, (channels, size, size), 0, dtype, draw=torch.rand)


def meta_gradient(model, batch):
    model.zero_grad()
    model.episode_loss(batch)[0].mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("conv", ["grouped", "matmul"])
@pytest.mark.parametrize(
    "backbone",
    [
        lambda: Conv4(pooling="stride", hidden=8, out_features=5, track_running_stats=False),
        lambda: Conv4(pooling="max", hidden=8, out_features=5, track_running_stats=False),
        lambda: MLP(in_features=1, hidden=(8, 8), out_features=3),
    ],
    ids=["conv4-stride", "conv4-max", "mlp"],
)
def test_each_task_gets_its_own_weights(backbone, conv):
    torch.manual_seed(0)
    net = backbone().double()
    tasks = 3
    x = (
        torch.randn(tasks, 4, 1, 28, 28, dtype=torch.float64)
        if isinstance(net, Conv4)
        else torch.randn(tasks, 4, 1, dtype=torch.float64)
    )
    params = {name: p + 0.1 * torch.randn(tasks, *p.shape, dtype=p.dtype) for name, p in net.named_parameters()}
    expected = torch.stack([functional_call(net, {n: p[t] for n, p in params.items()}, (x[t],)) for t in range(tasks)])
    with TaskBatched(tasks, conv):
        found = functional_call(net, params, (x.flatten(0, 1),))
    torch.testing.assert_close(found.view_as(expected), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("chunk", [None, 2])
def test_batched_maml_equals_the_loop(first_order, steps, chunk):
    """Losses, predictions and meta-gradients to float64 precision, second order included."""
    torch.manual_seed(0)
    backbone = Conv4(pooling="stride", hidden=16, out_features=5, track_running_stats=False).double()
    batch = image_batch()
    out, grads = {}, {}
    for mode in ("loop", "batched"):
        model = MAML(backbone, inner_lr=0.4, inner_steps=steps, first_order=first_order, task_batching=mode,
                     tasks_per_chunk=chunk).double()  # fmt: skip
        out[mode] = model.episode_loss(batch)
        grads[mode] = meta_gradient(model, batch)
    torch.testing.assert_close(out["batched"].loss, out["loop"].loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["batched"].predictions, out["loop"].predictions, rtol=1e-10, atol=1e-12)
    rel = (grads["loop"] - grads["batched"]).norm() / grads["loop"].norm()
    assert rel < 1e-10, rel


def test_batched_evaluation_curve_meta_sgd_and_head_equal_the_loop():
    torch.manual_seed(0)
    body = Conv4(pooling="stride", hidden=8, track_running_stats=False).double()
    head = nn.Linear(body.embedding_dim, 5).double()
    batch = image_batch(tasks=2)
    found = {}
    for mode in ("loop", "batched"):
        model = MAML(body, head=head, inner_optimizer=MetaSGD(0.3, per="element"), inner_steps_eval=4,
                     task_batching=mode).double().eval()  # fmt: skip
        found[mode] = model.episode_loss(batch), meta_gradient(model.train(), batch)
    (loop_out, loop_grad), (batched_out, batched_grad) = found["loop"], found["batched"]
    assert batched_out.adaptation.losses.shape == (2, 5)
    torch.testing.assert_close(batched_out.adaptation.losses, loop_out.adaptation.losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batched_grad, loop_grad, rtol=1e-9, atol=1e-12)


def test_batched_resnet12_equals_the_loop():
    torch.manual_seed(0)
    backbone = ResNet12(
        in_channels=3, channels=(4, 4, 4, 4), image_size=16, drop_rate=0.0, track_running_stats=False
    ).double()
    head = nn.Linear(backbone.embedding_dim, 5).double()
    batch = image_batch(tasks=2, queries=1, channels=3, size=16)
    grads = {}
    for mode in ("loop", "batched"):
        model = MAML(backbone, head=head, inner_lr=0.1, first_order=True, task_batching=mode).double()
        grads[mode] = meta_gradient(model, batch)
    torch.testing.assert_close(grads["batched"], grads["loop"], rtol=1e-9, atol=1e-11)


def test_layers_that_cannot_run_per_task_are_refused_with_the_fix():
    net = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(TaskBatchingError, match=r"LayerNorm \(1\).*task_batching='loop'"):
        check_task_batchable(net, dict(net.named_parameters()))
    check_task_batchable(net, {"0.weight": net[0].weight})  # the LayerNorm does not adapt: fine
    tracking = Conv4(out_features=5, track_running_stats=True)
    with pytest.raises(TaskBatchingError, match="running statistics"):
        MAML(tracking, task_batching="batched")
    with pytest.raises(ValueError, match="tasks_per_chunk=0"):
        MAML(Conv4(out_features=5, track_running_stats=False), tasks_per_chunk=0)


def test_auto_times_the_batched_layers_too_and_skips_them_where_unsupported(caplog):
    torch.manual_seed(0)
    batch = image_batch(tasks=2, dtype=torch.float32)
    auto = MAML(Conv4(pooling="stride", hidden=8, out_features=5, track_running_stats=False), task_batching="auto")
    auto.episode_loss(batch)
    assert auto._chosen_batching[True] in ("loop", "vmap", "batched")
    with_running_stats = MAML(Conv4(pooling="stride", hidden=8, out_features=5), task_batching="auto")
    with_running_stats.episode_loss(batch)
    assert with_running_stats._chosen_batching[True] in ("loop", "vmap")


def test_expanded_parameters_are_views_whose_gradients_sum_back():
    w = torch.randn(3, 2, requires_grad=True)
    expanded = expand_tasks({"w": w}, 4)["w"]
    assert expanded.shape == (4, 3, 2) and expanded.data_ptr() == w.data_ptr()
    (expanded * torch.arange(4.0).view(4, 1, 1)).sum().backward()
    torch.testing.assert_close(w.grad, torch.full((3, 2), 6.0))


def test_batched_evaluation_adapts_under_no_grad_as_lightning_validates():
    """Views of parameters made under no_grad say requires_grad but are cut from autograd."""
    torch.manual_seed(0)
    backbone = Conv4(pooling="stride", hidden=8, out_features=5, track_running_stats=False).double()
    batch = image_batch(tasks=2)
    found = {}
    for mode in ("loop", "batched"):
        model = MAML(backbone, inner_lr=0.4, inner_steps_eval=2, task_batching=mode).double().eval()
        with torch.no_grad():
            found[mode] = model.episode_loss(batch)
    torch.testing.assert_close(found["batched"].loss, found["loop"].loss, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(found["batched"].adaptation.losses[:, 0], found["batched"].adaptation.losses[:, -1])
