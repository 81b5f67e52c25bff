"""R2-D2: ridge regression as a differentiable closed-form head (Bertinetto, Henriques, Torr and Vedaldi 2019)."""

from __future__ import annotations

import math

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from datamodules.episodes import EpisodeBatch

from ..backbones import Conv4
from ..bases.episodic import EpisodicModule, embed_episode, support_onehot
from ..memory_format import channels_last_argument
from ..precision import solver_precision
from ..solvers import ridge_regression


class R2D2(EpisodicModule):
    """R2-D2: fit a ridge regression from each support set's features to its one-hot labels, in closed form.

    Per episode the backbone embeds support and query in one pass; a column of ones is appended to
    the support features (the bias), and ridge regression to the one-hot labels is solved through
    the Woodbury identity, an ``NK x NK`` system per task, batched over tasks (Bertinetto et al.
    2019, section 3.2). The query logits are the paper's adjust layer ``alpha * X_q W + beta``
    (section 3.3), with ``alpha``, ``beta`` and the regulariser ``lambda`` learned by the outer
    loop; ``lambda`` is learned as its logarithm, so it stays positive. As in the authors' code, the
    features and targets are divided by ``sqrt(NK)``, so ``lambda`` weighs against the mean
    squared error: the system solved is ``X X^T + NK * lambda * I``.

    The solve runs in float32 (float64 for float64 features) with autocast off: linear solves are
    not autocast-safe, and bf16 Gram matrices would be too coarse to invert.

    Args:
        backbone: embedding network; default ``Conv4(in_channels=1)`` (Omniglot).
        init_lambda: initial regulariser (50, the authors' default).
        learn_lambda: learn ``lambda`` with the backbone (else it stays ``init_lambda``).
        init_scale: initial ``alpha`` (the authors use 1e-4 on mini-ImageNet, 10 on Omniglot and CIFAR-FS).
        init_bias: initial ``beta``.
        channels_last: deprecated; this module asks the Trainer for the
            :class:`~lightning_meta.memory_format.ChannelsLast` callback (False here turns that off).
        optimizer: outer optimizer factory (the authors: Adam, lr 5e-3).
        lr_scheduler: optional; the authors halve the learning rate every 20 epochs of 100 episodes.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        init_lambda: float = 50.0,
        learn_lambda: bool = True,
        init_scale: float = 1e-4,
        init_bias: float = 0.0,
        channels_last: bool | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if not init_lambda > 0:
            raise ValueError(f"R2D2: init_lambda={init_lambda} must be a positive regulariser; the authors use 50")
        if not math.isfinite(init_scale) or init_scale == 0:
            raise ValueError(
                f"R2D2: init_scale={init_scale} must be finite and non-zero (zero logits never learn); "
                "the authors use 1e-4 on mini-ImageNet and 10 on Omniglot and CIFAR-FS"
            )
        super().__init__(backbone if backbone is not None else Conv4(), optimizer, lr_scheduler)
        self.log_lambda = nn.Parameter(torch.tensor(math.log(init_lambda)), requires_grad=learn_lambda)
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))
        self.wants_channels_last = channels_last_argument("R2D2", channels_last, True)

    @property
    def lam(self) -> Tensor:
        """The ridge regulariser ``lambda`` (positive)."""
        return self.log_lambda.exp()

    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        support, query = embed_episode(self.backbone, batch)  # at least float32
        with solver_precision(support):
            x = torch.cat([support, torch.ones_like(support[..., :1])], dim=-1)
            y = support_onehot(batch, x.dtype)
            shots_total = x.shape[1]
            w = ridge_regression(x, y, shots_total * self.lam.to(x.dtype))  # [B, D + 1, N]
            logits = query @ w[:, :-1] + w[:, -1:]
            return self.scale * logits + self.bias
