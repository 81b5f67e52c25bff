"""R2-D2: the Woodbury ridge solution, its gradients, and the solve under bf16 autocast."""

import math

import pytest
import torch
import torch.nn.functional as F
from episode_factory import make_episodes
from torch import nn

from lightning_meta import R2D2, Conv4
from lightning_meta.algorithms.r2d2 import ridge_regression


def test_woodbury_solution_equals_the_direct_ridge_solution():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 40, generator=g, dtype=torch.float64)  # n < D: the few-shot case
    y = F.one_hot(torch.arange(10) % 5, 5).to(torch.float64).expand(3, -1, -1)
    lam = 0.7
    direct = torch.linalg.inv(x.transpose(1, 2) @ x + lam * torch.eye(40, dtype=torch.float64)) @ x.transpose(1, 2) @ y
    woodbury = ridge_regression(x, y, lam)
    torch.testing.assert_close(woodbury, direct, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ridge_regression(x, y, lam, woodbury=False), direct, rtol=1e-9, atol=1e-10)
    # The solution is the minimiser: the ridge objective's gradient vanishes there.
    residual = x.transpose(1, 2) @ (x @ woodbury - y) + lam * woodbury
    assert residual.abs().max() < 1e-9


def test_logits_are_the_adjusted_ridge_predictions():
    batch = make_episodes(2, 3, 2, 4, (6,), seed=0, dtype=torch.float64)
    model = R2D2(nn.Identity(), init_lambda=2.0, init_scale=3.0, init_bias=0.5).double()
    x = torch.cat([batch.support_x, torch.ones(2, 6, 1, dtype=torch.float64)], -1)
    y = F.one_hot(batch.support_y, 3).double()
    n = x.shape[1]
    # The authors' code divides features and targets by sqrt(n) and solves with lambda.
    xs, ys = x / math.sqrt(n), y / math.sqrt(n)
    w = xs.transpose(1, 2) @ torch.linalg.inv(xs @ xs.transpose(1, 2) + 2.0 * torch.eye(n, dtype=torch.float64)) @ ys
    expected = 3.0 * (batch.query_x @ w[:, :-1] + w[:, -1:]) + 0.5
    torch.testing.assert_close(model.episode_logits(batch), expected)


def test_gradients_reach_lambda_scale_bias_and_backbone():
    torch.manual_seed(0)
    model = R2D2(Conv4(hidden=8), init_scale=10.0)
    batch = make_episodes(2, 5, 1, 2, (1, 28, 28), seed=1)
    model.episode_loss(batch)[0].mean().backward()
    for name in ("log_lambda", "scale", "bias"):
        grad = getattr(model, name).grad
        assert grad is not None and grad.abs() > 0, name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    assert model.lam.item() == pytest.approx(50.0)
    model = R2D2(Conv4(hidden=8), learn_lambda=False)
    assert not model.log_lambda.requires_grad


def test_bf16_autocast_solves_in_float32():
    torch.manual_seed(0)
    model = R2D2(Conv4(hidden=8), init_scale=10.0).eval()
    batch = make_episodes(2, 5, 5, 3, (1, 28, 28), seed=1)
    fp32 = model.episode_loss(batch)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.episode_logits(batch)
        bf16 = model.episode_loss(batch)[0]
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert not torch.equal(bf16, fp32), "autocast had no effect on the backbone"
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)
    # With a float32 backbone output, the solve and the head give the float32 result under autocast too
    # (bf16 Gram matrices and products would be off by about 1e-2).
    identity = R2D2(nn.Identity(), init_lambda=0.1, init_scale=1.0)
    features = make_episodes(2, 5, 5, 3, (64,), seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = identity.episode_logits(features)
    torch.testing.assert_close(autocast, identity.episode_logits(features), rtol=1e-5, atol=1e-5)


def test_any_number_of_ways_and_learns_a_separable_episode():
    # One ridge fit per episode: on well-separated support points the queries are classified exactly.
    torch.manual_seed(0)
    centres = torch.randn(7, 16) * 5
    support = (centres.repeat_interleave(2, 0) + 0.1 * torch.randn(14, 16)).unsqueeze(0)
    query = (centres.repeat_interleave(3, 0) + 0.1 * torch.randn(21, 16)).unsqueeze(0)
    labels = torch.arange(7)
    batch = (support, labels.repeat_interleave(2)[None], query, labels.repeat_interleave(3)[None])
    model = R2D2(nn.Identity(), init_lambda=0.1, init_scale=1.0)
    logits = model.episode_outputs(batch).predictions
    assert logits.shape == (1, 21, 7)
    assert (logits.argmax(-1) == batch[3]).all()


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="init_lambda=0"):
        R2D2(nn.Identity(), init_lambda=0)
    with pytest.raises(ValueError, match="init_scale=0"):
        R2D2(nn.Identity(), init_scale=0)
