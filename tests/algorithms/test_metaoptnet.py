"""MetaOptNet: SVM and ridge heads on embedded episodes, iterations per stage, label smoothing, precision, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.episodes import EpisodeBatch
from lightning_meta import MetaOptNet
from lightning_meta.algorithms import metaoptnet as metaoptnet_module
from lightning_meta.algorithms.metaoptnet import lr_schedule
from lightning_meta.solvers import crammer_singer_svm


class Flatten(nn.Module):
    """A linear backbone on 4x4 one-channel images, so the expected logits can be computed by hand."""

    embedding_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, self.embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def batch(tasks: int = 2, ways: int = 5, shots: int = 2, queries: int = 3, seed: int = 0) -> EpisodeBatch:
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    centres = torch.randn(tasks, ways, 1, 4, 4, generator=g)

    def images(y: torch.Tensor) -> torch.Tensor:
        return centres[torch.arange(tasks)[:, None], y] + 0.5 * torch.randn(*y.shape, 1, 4, 4, generator=g)

    return EpisodeBatch(images(support_y), support_y.contiguous(), images(query_y), query_y.contiguous())


def model(**kwargs) -> MetaOptNet:
    torch.manual_seed(0)
    return MetaOptNet(Flatten(), **kwargs)


def test_svm_logits_are_the_scaled_scores_of_the_support_svm():
    net, episodes = model(scale=2.0), batch()
    net.eval()
    logits = net.episode_logits(episodes)
    support = net.backbone(episodes.support_x.flatten(0, 1)).view(2, 10, -1).double()
    query = net.backbone(episodes.query_x.flatten(0, 1)).view(2, 15, -1).double()
    alpha = crammer_singer_svm(support @ support.transpose(1, 2), episodes.support_y, 5, C=0.1, iterations=3).alpha
    expected = 2.0 * (query @ support.transpose(1, 2)) @ alpha
    assert logits.shape == (2, 15, 5) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected.float())


def test_ridge_head_is_kernel_ridge_regression():
    net, episodes = model(head="ridge", ridge_lambda=5.0), batch()
    logits = net.episode_logits(episodes)
    support = net.backbone(episodes.support_x.flatten(0, 1)).view(2, 10, -1).double()
    query = net.backbone(episodes.query_x.flatten(0, 1)).view(2, 15, -1).double()
    y = F.one_hot(episodes.support_y, 5).double()
    w = torch.linalg.solve(support.transpose(1, 2) @ support + 5.0 * torch.eye(6, dtype=torch.float64),
                           support.transpose(1, 2) @ y)  # fmt: skip
    torch.testing.assert_close(logits, (query @ w).float())


def test_training_and_evaluation_use_their_own_solver_iterations(monkeypatch):
    seen: list[int] = []

    def spy(*args, **kwargs):
        seen.append(args[4])
        return crammer_singer_svm(*args, **kwargs)

    monkeypatch.setattr(metaoptnet_module, "crammer_singer_svm", spy)
    net, episodes = model(solver_iters=7, solver_iters_eval=2), batch()
    net.train()
    net.episode_loss(episodes)
    net.eval()
    net.episode_loss(episodes)
    assert seen == [7, 2]


def test_label_smoothing_follows_their_targets_in_training_only():
    net, episodes = model(label_smoothing=0.1), batch()
    net.train()
    loss, logits = net.episode_loss(episodes)
    # Their train.py: 1 - eps on the true class, eps / (N - 1) on each of the others.
    target = F.one_hot(episodes.query_y, 5).float() * 0.9 + (1 - F.one_hot(episodes.query_y, 5).float()) * 0.1 / 4
    expected = -(target * logits.log_softmax(-1)).sum(-1).mean(1)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, F.cross_entropy(logits.transpose(1, 2), episodes.query_y, reduction="none").mean(1))
    net.eval()
    loss, logits = net.episode_loss(episodes)
    torch.testing.assert_close(
        loss, F.cross_entropy(logits.transpose(1, 2), episodes.query_y, reduction="none").mean(1)
    )


def test_gradients_reach_the_backbone_and_the_scale():
    net, episodes = model(), batch()
    net.train()
    loss, _ = net.episode_loss(episodes)
    loss.mean().backward()
    assert net.scale.grad is not None and net.scale.grad.abs() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in net.backbone.parameters())  # fmt: skip
    assert not model(learn_scale=False).scale.requires_grad


def test_bf16_autocast_returns_float32_logits_close_to_fp32():
    net, episodes = model(), batch()
    net.eval()
    fp32 = net.episode_logits(episodes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = net.episode_logits(episodes)
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, fp32, rtol=0.1, atol=0.05)


def test_float32_solver_matches_float64():
    episodes = batch()
    net64, net32 = model(solver_iters_eval=20), model(solver_iters_eval=20, solver_dtype="float32")
    net64.eval(), net32.eval()
    torch.testing.assert_close(net32.episode_logits(episodes), net64.episode_logits(episodes), rtol=1e-3, atol=1e-4)


def test_lr_schedule_is_the_papers():
    factors = [0.1 * lr_schedule(e) for e in (0, 19, 20, 39, 40, 49, 50, 59)]
    assert factors == pytest.approx([0.1, 0.1, 0.006, 0.006, 0.0012, 0.0012, 0.00024, 0.00024])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"C": 0.0}, r"C=0\.0 must be a finite number above 0"),
        ({"C": float("nan")}, r"C=nan must be a finite number above 0"),
        ({"solver_iters": 0}, r"solver_iters=0 must be a whole number of 1 or more"),
        ({"solver_iters_eval": 1.5}, r"solver_iters_eval=1\.5 must be a whole number"),
        ({"ridge_lambda": -1.0}, r"ridge_lambda=-1\.0 must be"),
        ({"label_smoothing": 1.0}, r"label_smoothing=1\.0 must be in \[0, 1\)"),
        ({"head": "logistic"}, r"head='logistic' must be one of \['svm', 'ridge'\]"),
        ({"solver_dtype": "bfloat16"}, r"solver_dtype='bfloat16' must be"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetaOptNet(Flatten(), **kwargs)
