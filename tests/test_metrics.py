import math

import torch

from lightning_meta.metrics import ConfidenceInterval95, episode_accuracy


def test_ci95_matches_the_textbook_formula_over_several_updates():
    values = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    metric = ConfidenceInterval95()
    for chunk in values.split(64):
        metric.update(chunk)
    expected = 1.96 * values.double().std(unbiased=True).item() / math.sqrt(1000)
    assert abs(metric.compute().item() - expected) < 1e-6
    metric.reset()
    metric.update(torch.tensor([0.5]))
    assert math.isnan(metric.compute().item())


def test_episode_accuracy_is_per_episode():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [3.0, 1.0]]])  # [B=2, Q=2, N=2]
    target = torch.tensor([[0, 1], [1, 1]])
    torch.testing.assert_close(episode_accuracy(logits, target), torch.tensor([1.0, 0.0]))
