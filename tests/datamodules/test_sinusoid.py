import math

import pytest
import torch

from datamodules import Sinusoid


def test_sinusoid_episodes_follow_the_maml_task_distribution():
    dm = Sinusoid(shots=10, queries=7, tasks_per_batch=500, train_episodes=500)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (500, 10, 1) and batch.query_y.shape == (500, 7, 1)
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    assert x.min() >= -5 and x.max() <= 5
    assert y.abs().max() <= 5.0
    # Recover amplitude and phase per task by least squares on sin/cos features.
    features = torch.cat([torch.sin(x), -torch.cos(x)], -1)  # A sin(x - p) = A cos p sin x - A sin p cos x
    coef = torch.linalg.lstsq(features, y).solution.squeeze(-1)
    amplitude = coef.norm(dim=-1)
    phase = torch.atan2(coef[:, 1], coef[:, 0])
    assert amplitude.min() >= 0.1 - 1e-4 and amplitude.max() <= 5.0 + 1e-4
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4
    assert amplitude.max() > 4.5 and amplitude.min() < 0.6  # covers the range


def test_sinusoid_eval_episodes_are_fixed_by_seed():
    a, b, c = Sinusoid(seed=3), Sinusoid(seed=3), Sinusoid(seed=4)
    for dm in (a, b, c):
        dm.setup("validate")
    first = [next(iter(dm.val_dataloader())).support_y for dm in (a, b, c)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


def test_sinusoid_rejects_inverted_ranges():
    with pytest.raises(ValueError, match="amplitude_min=5.0 must not exceed amplitude_max=1.0"):
        Sinusoid(amplitude_min=5.0, amplitude_max=1.0)
