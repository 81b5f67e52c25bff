"""MAML++ (Antoniou et al. 2019): each switch changes what it should and nothing else."""

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from episode_factory import make_episodes
from torch import nn

from datamodules import Omniglot
from lightning_meta import LSLR, MAML, Conv4, MAMLPlusPlus, TaskBatchNorm2d
from lightning_meta.algorithms.mamlpp import PerStepBatchNorm2d, per_step_batch_norm, per_step_loss_weights

# task_batching: "auto" would time both ways, and vmap rounds differently from the loop.
OFF = {
    "task_batching": "loop",
    "multi_step_loss": False,
    "per_step_bn": False,
    "learn_inner_lr_per_step": False,
    "first_order_epochs": 0,
}


def conv4(dtype=torch.float32, seed=0, ways=5):
    torch.manual_seed(seed)
    return Conv4(hidden=4, image_size=12, out_features=ways, pooling="stride", track_running_stats=False).to(dtype)


def episodes(dtype=torch.float32, tasks=2):
    return make_episodes(tasks, 5, 1, 2, (1, 12, 12), dtype=dtype)


def loss_and_grads(model, batch, train=True):
    model.train(train)
    model.zero_grad()
    out = model.episode_loss(batch)
    if train:
        out.loss.mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def maml(backbone, **kwargs):
    return MAML(copy.deepcopy(backbone), inner_lr=0.4, task_batching="loop", **kwargs)


# ---------------------------------------------------------------------- all switches off
def test_all_switches_off_is_maml_exactly():
    backbone, batch = conv4(), episodes()
    plus = MAMLPlusPlus(copy.deepcopy(backbone), inner_lr=0.4, inner_steps=2, inner_steps_eval=3, **OFF)
    reference = maml(backbone, inner_steps=2, inner_steps_eval=3)
    (a, grads_a), (b, grads_b) = loss_and_grads(plus, batch), loss_and_grads(reference, batch)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.predictions, b.predictions)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    (a, _), (b, _) = loss_and_grads(plus, batch, train=False), loss_and_grads(reference, batch, train=False)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.adaptation.losses, b.adaptation.losses)
    assert a.adaptation.steps == b.adaptation.steps == [0, 1, 2, 3]


# ---------------------------------------------------------------------- MSL
def reference_weights(steps, msl_epochs, epoch):
    """``get_per_step_loss_importance_vector`` of Antoniou et al.'s few_shot_learning_system.py, in numpy."""
    loss_weights = np.ones(shape=(steps)) * (1.0 / steps)
    decay_rate = 1.0 / steps / msl_epochs
    min_value_for_non_final_losses = 0.03 / steps
    for i in range(len(loss_weights) - 1):
        loss_weights[i] = np.maximum(loss_weights[i] - (epoch * decay_rate), min_value_for_non_final_losses)
    loss_weights[-1] = np.minimum(
        loss_weights[-1] + (epoch * (steps - 1) * decay_rate), 1.0 - ((steps - 1) * min_value_for_non_final_losses)
    )
    return loss_weights


@pytest.mark.parametrize("steps, msl_epochs", [(5, 10), (5, 15), (3, 2), (2, 1)])
def test_msl_weights_follow_the_reference_schedule_and_sum_to_one(steps, msl_epochs):
    previous = None
    for epoch in range(msl_epochs + 3):
        weights = np.array(per_step_loss_weights(steps, msl_epochs, epoch))
        np.testing.assert_allclose(weights, reference_weights(steps, msl_epochs, epoch), rtol=0, atol=1e-15)
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)
        if epoch == 0:
            np.testing.assert_allclose(weights, np.full(steps, 1 / steps))
        else:  # mass moves from the earlier steps to the last, and never below the floor
            assert (weights[:-1] <= previous[:-1]).all() and weights[-1] >= previous[-1]
            assert (weights[:-1] >= 0.03 / steps - 1e-15).all()
        previous = weights


def test_msl_is_the_weighted_sum_of_the_query_losses_after_each_step():
    """At epoch 0 (uniform weights) the loss and meta-gradient are the mean of MAML's after 1, 2 and 3 steps."""
    backbone, batch = conv4(torch.float64), episodes(torch.float64)
    plus = MAMLPlusPlus(copy.deepcopy(backbone), inner_lr=0.4, inner_steps=3, **{**OFF, "multi_step_loss": True})
    assert plus.step_loss_weights() == pytest.approx([1 / 3] * 3)
    out, grads = loss_and_grads(plus, batch)
    losses, summed = [], {}
    for steps in (1, 2, 3):
        maml_out, maml_grads = loss_and_grads(maml(backbone, inner_steps=steps), batch)
        losses.append(maml_out.loss)
        summed = {k: summed.get(k, 0) + g / 3 for k, g in maml_grads.items()}
    torch.testing.assert_close(out.loss, sum(losses) / 3, rtol=1e-12, atol=1e-12)
    for name, g in summed.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out.loss, losses[-1])
    plus.eval()
    assert plus.step_loss_weights() is None  # evaluation reports the last step's loss


def test_msl_with_all_weight_on_the_last_step_is_maml(monkeypatch):
    backbone, batch = conv4(torch.float64), episodes(torch.float64)
    plus = MAMLPlusPlus(copy.deepcopy(backbone), inner_lr=0.4, inner_steps=3, **{**OFF, "multi_step_loss": True})
    monkeypatch.setattr(plus, "step_loss_weights", lambda: [0.0, 0.0, 1.0])
    (a, grads_a) = loss_and_grads(plus, batch)
    (b, grads_b) = loss_and_grads(maml(backbone, inner_steps=3), batch)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- per-step batch norm (BNRS + BNWB)
def test_per_step_norm_uses_and_updates_only_the_current_step():
    torch.manual_seed(0)
    norm = PerStepBatchNorm2d(3, steps=3)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(3, 3) + 0.5)
        norm.bias.copy_(torch.randn(3, 3))
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    for step in range(3):
        before = (norm.running_mean.clone(), norm.running_var.clone())
        norm.step = step
        y = norm(x)
        torch.testing.assert_close(y, F.batch_norm(x, None, None, norm.weight[step], norm.bias[step], True))
        for stats, old in zip((norm.running_mean, norm.running_var), before, strict=True):
            changed = [k for k in range(3) if not torch.equal(stats[k], old[k])]
            assert changed == [step]
    norm.step = 7  # a longer evaluation than training reuses the last step's row
    torch.testing.assert_close(norm(x), F.batch_norm(x, None, None, norm.weight[2], norm.bias[2], True))
    norm.eval()
    before = norm.running_mean.clone(), norm.running_var.clone()
    norm.step = 0
    torch.testing.assert_close(norm(x), F.batch_norm(x, None, None, norm.weight[0], norm.bias[0], True))
    assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])


def test_per_step_batch_norm_converts_both_batch_norms_and_keeps_their_affine_parameters():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Sequential(TaskBatchNorm2d(3)))
    with torch.no_grad():
        net[1].weight.fill_(2.0)
        net[2][0].bias.fill_(-1.0)
    per_step_batch_norm(net, 4)
    assert isinstance(net[1], PerStepBatchNorm2d) and isinstance(net[2][0], PerStepBatchNorm2d)
    assert net[1].weight.shape == (4, 3) and torch.equal(net[1].weight, torch.full((4, 3), 2.0))
    assert torch.equal(net[2][0].bias, torch.full((4, 3), -1.0))
    with pytest.raises(ValueError, match="steps=4; MAML\\+\\+ needs 2"):
        per_step_batch_norm(net, 2)


def test_per_step_norms_learn_in_the_outer_loop_only_and_keep_statistics_per_step():
    model = MAMLPlusPlus(conv4(), inner_steps=3, **{**OFF, "per_step_bn": True, "learn_inner_lr_per_step": True})
    norms = [m for m in model.modules() if isinstance(m, PerStepBatchNorm2d)]
    assert len(norms) == 4 and not any(isinstance(m, TaskBatchNorm2d) for m in model.modules())
    assert all(m.weight.shape == (3, 4) for m in norms)
    in_norms = {id(p) for m in norms for p in m.parameters()}
    adapted = model.adapt_params()
    assert adapted and not any(id(p) in in_norms for p in adapted.values())  # not adapted in the inner loop
    assert set(model.inner_optimizer.lrs) == {n.replace(".", "/") for n in adapted}
    assert model.task_batching == "loop"
    _, grads = loss_and_grads(model, episodes())
    norm_names = [name for name, p in model.named_parameters() if id(p) in in_norms]
    assert len(norm_names) == 8
    for name in norm_names:  # every step's weight and bias is learned (BNWB)
        assert (grads[name].abs().sum(1) > 0).all(), name
    # Training collected statistics for every step; they differ between steps (BNRS).
    first = norms[1].running_mean
    assert (first != 0).any(1).all() and not torch.equal(first[0], first[2])
    before = [m.running_mean.clone() for m in norms]
    loss_and_grads(model, episodes(), train=False)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))


def test_first_order_per_step_norms_learn_from_the_last_step_only():
    """First order, a step's norms shape only that step's (constant) inner gradient; the last step's meet the query."""
    model = MAMLPlusPlus(conv4(), inner_steps=3, first_order=True, **{**OFF, "per_step_bn": True})
    _, grads = loss_and_grads(model, episodes())
    norm = next(m for m in model.modules() if isinstance(m, PerStepBatchNorm2d))
    assert norm.weight.grad is not None and (norm.weight.grad[:2] == 0).all() and (norm.weight.grad[2] != 0).any()


# ---------------------------------------------------------------------- LSLR
def test_lslr_takes_each_steps_own_rate():
    opt = LSLR(lr=0.1, steps=3)
    p = {"layer.weight": torch.randn(2, 2)}
    g = {"layer.weight": torch.randn(2, 2)}
    opt.bind(p)
    assert opt.lrs["layer/weight"].shape == (3,) and torch.equal(opt.lrs["layer/weight"], torch.full((3,), 0.1))
    with torch.no_grad():
        opt.lrs["layer/weight"].copy_(torch.tensor([1.0, 2.0, 3.0]))
    for t, rate in ((1, 1.0), (2, 2.0), (3, 3.0), (5, 3.0)):
        torch.testing.assert_close(
            opt.step(p, g, None, t)[0]["layer.weight"], p["layer.weight"] - rate * g["layer.weight"]
        )
    with pytest.raises(ValueError, match="inner_lr"):
        LSLR(lr=0.0)


def test_lslr_learns_one_rate_per_layer_and_step():
    model = MAMLPlusPlus(conv4(), inner_steps=3, **{**OFF, "learn_inner_lr_per_step": True})
    assert isinstance(model.inner_optimizer, LSLR)
    names = {n.replace(".", "/") for n in model.adapt_params()}
    assert set(model.inner_optimizer.lrs) == names
    assert all(lr.shape == (3,) and torch.all(lr == 0.1) for lr in model.inner_optimizer.lrs.values())
    _, grads = loss_and_grads(model, episodes())
    for name in names:
        assert (grads[f"inner_optimizer.lrs.{name}"] != 0).all(), name


def test_lslr_and_msl_batch_tasks_in_a_loop_or_under_vmap_alike():
    backbone, batch = conv4(), episodes(tasks=3)
    switches = {**OFF, "multi_step_loss": True, "learn_inner_lr_per_step": True}
    del switches["task_batching"]
    loop = MAMLPlusPlus(copy.deepcopy(backbone), inner_steps=2, task_batching="loop", **switches)
    vmap = MAMLPlusPlus(copy.deepcopy(backbone), inner_steps=2, task_batching="vmap", **switches)
    (a, grads_a), (b, grads_b) = loss_and_grads(loop, batch), loss_and_grads(vmap, batch)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------- derivative-order annealing
def test_before_first_order_epochs_the_meta_gradient_is_fomamls():
    backbone, batch = conv4(torch.float64), episodes(torch.float64)
    plus = MAMLPlusPlus(copy.deepcopy(backbone), inner_lr=0.4, inner_steps=2, **{**OFF, "first_order_epochs": 1})
    assert plus.current_epoch == 0 and not plus.second_order
    _, grads_a = loss_and_grads(plus, batch)
    _, grads_b = loss_and_grads(maml(backbone, inner_steps=2, first_order=True), batch)
    _, second = loss_and_grads(maml(backbone, inner_steps=2), batch)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_b)
    assert not all(torch.allclose(grads_a[k], second[k]) for k in second)


class Record(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, module.second_order, module.step_loss_weights()))


def test_derivative_order_and_msl_follow_the_trainers_epoch(fake_omniglot, tmp_path):
    model = MAMLPlusPlus(conv4(ways=2), inner_steps=2, msl_epochs=2, first_order_epochs=2)
    dm = Omniglot(root=str(fake_omniglot), ways=2, shots=1, queries=1, rotations=False, tasks_per_batch=1)
    record = Record()
    trainer = pl.Trainer(max_epochs=4, limit_train_batches=1, limit_val_batches=0, inference_mode=False, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[record],
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, dm)
    assert [(epoch, order) for epoch, order, _ in record.seen] == [(0, False), (1, False), (2, True), (3, True)]
    weights = [w for _, _, w in record.seen]
    assert weights[:2] == [per_step_loss_weights(2, 2, 0), per_step_loss_weights(2, 2, 1)] and weights[0] == [0.5, 0.5]
    assert weights[2:] == [None, None]  # after msl_epochs, the last step's loss alone


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"msl_epochs": -1}, "msl_epochs=-1 must be a whole number"),
        ({"first_order_epochs": 1.5}, "first_order_epochs=1.5 must be a whole number"),
        ({"inner_steps": 0}, "inner_steps=0 leaves nothing per step"),
        ({"task_batching": "vmap"}, "per_step_bn=True updates per-step running statistics in place"),
        ({"inner_optimizer": LSLR()}, "both choose the inner optimizer"),
        ({"adapt": ".*features\\.1\\..*"}, "selects only batch-norm parameters"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAMLPlusPlus(conv4(), **kwargs)


def test_tasks_together_is_refused_and_never_timed():
    """MAML++'s own inner loop runs one task at a time (or under vmap); 'batched' is MAML's alone."""
    from lightning_meta import Conv4, MAMLPlusPlus

    net = Conv4(pooling="stride", hidden=8, out_features=5, track_running_stats=False)
    with pytest.raises(ValueError, match="task_batching='batched'"):
        MAMLPlusPlus(net, per_step_bn=False, task_batching="batched")
    assert "batched" not in MAMLPlusPlus.task_batchings
