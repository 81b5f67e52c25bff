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
        self.in_features = in_features

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            what = f"images {tuple(x.shape[-3:])}" if x.dim() >= 4 else f"vectors of {x.shape[-1]} values"
            raise ValueError(
                f"MLP takes vectors of in_features={self.in_features} values but got {what}; for images use an "
                "image backbone (--model.backbone lightning_meta.Conv4), else set the MLP's in_features"
            )
        return self.net(x)
