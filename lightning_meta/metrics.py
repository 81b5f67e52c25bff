"""Episode metrics: per-episode accuracy and its 95% confidence interval, as papers report them."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_accuracy


def episode_accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Accuracy of each episode: ``logits [B, Q, N]``, ``target [B, Q]`` -> ``[B]``."""
    return multiclass_accuracy(
        logits.argmax(-1),
        target,
        num_classes=logits.shape[-1],
        average="micro",
        multidim_average="samplewise",
        validate_args=False,
    )


class ConfidenceInterval95(Metric):
    """Half-width of the normal 95% confidence interval of the mean, ``1.96 * std / sqrt(n)``.

    ``std`` is the sample standard deviation over the values seen (one per episode), reduced
    across processes, as in Snell et al. 2017 and Finn et al. 2017.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False
    total: Tensor
    total_sq: Tensor
    count: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        values = values.detach().to(torch.float64).flatten()
        self.total += values.sum()
        self.total_sq += values.square().sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        n = self.count
        if n < 2:
            return torch.tensor(float("nan"))
        mean = self.total / n
        var = (self.total_sq - n * mean.square()).clamp_min(0) / (n - 1)
        return (1.96 * var.sqrt() / n.sqrt()).float()
