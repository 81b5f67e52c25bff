"""A multilayer perceptron backbone (the MAML paper's sinusoid regressor)."""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """A ReLU multilayer perceptron; the default is the MAML paper's sinusoid regressor (1-40-40-1).

    Args:
        in_features: input size.
        hidden: sizes of the hidden layers.
        out_features: output size.
    """

    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = in_features
        for width in hidden:
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        layers.append(nn.Linear(size, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
