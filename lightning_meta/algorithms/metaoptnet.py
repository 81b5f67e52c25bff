"""MetaOptNet (Lee, Maji, Ravichandran and Soatto 2019): a differentiable linear SVM head per episode."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from datamodules.episodes import EpisodeBatch, episode_ways

from ..arguments import check_choice, check_number, check_whole
from ..backbones import Conv4
from ..bases.episodic import EpisodicModule, at_least_float32, embed_episode
from ..memory_format import channels_last_argument
from ..precision import solver_precision
from ..solvers import crammer_singer_svm, kernel_ridge

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
HeadKind = Literal["svm", "ridge"]
SolverDtype = Literal["float32", "float64"]


class MetaOptNet(EpisodicModule):
    """MetaOptNet: fit a linear classifier on each episode's support embeddings, differentiably, and score the queries.

    The ``svm`` head solves the dual of the Crammer-Singer multi-class SVM (Lee et al. 2019,
    section 3.3, eq. 4) for every task of the meta-batch with the batched interior-point solver of
    :func:`lightning_meta.solvers.crammer_singer_svm`, whose gradient comes from implicit
    differentiation of the KKT conditions (their theorem 1). The ``ridge`` head is MetaOptNet-RR,
    dual ridge regression onto one-hot targets (section 4.1). Query logits are the linear scores
    times a learned scale (their code's ``ClassificationHead.scale``, the softmax temperature),
    computed in ``solver_dtype`` and returned in float32 (at least) under autocast too.

    Args:
        backbone: embedding network; default ``Conv4(in_channels=1)`` (Omniglot). The paper uses
            :class:`~lightning_meta.backbones.ResNet12` without global pooling.
        head: "svm" (MetaOptNet-SVM) or "ridge" (MetaOptNet-RR).
        C: the SVM's cost (0.1 in the paper, section 4.1).
        solver_iters: interior-point iterations in training (15 in their ``train.py``).
        solver_iters_eval: iterations in validation, test and predict (3 in their ``test.py``; section
            4.1 finds that stopping after three works as well or better).
        ridge_lambda: the ridge head's regulariser (50 in the paper).
        scale: initial logit scale.
        learn_scale: learn the scale (as the paper) or keep it fixed.
        label_smoothing: training-only label smoothing as in their ``train.py``: target ``1 - eps``
            on the true class and ``eps / (N - 1)`` on each other (0.1 on mini-ImageNet, section 4.1).
        solver_dtype: precision of the kernel, the solve and the logits ("float64" or "float32").
        channels_last: deprecated; this module asks the Trainer for the
            :class:`~lightning_meta.memory_format.ChannelsLast` callback (False here turns that off).
        optimizer: outer optimizer factory (the paper: SGD, Nesterov momentum 0.9, lr 0.1, weight decay 5e-4).
        lr_scheduler: optional scheduler factory, stepped once per epoch.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        head: HeadKind = "svm",
        C: float = 0.1,
        solver_iters: int = 15,
        solver_iters_eval: int = 3,
        ridge_lambda: float = 50.0,
        scale: float = 1.0,
        learn_scale: bool = True,
        label_smoothing: float = 0.0,
        solver_dtype: SolverDtype = "float64",
        channels_last: bool | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        check_choice("MetaOptNet", "head", head, HeadKind)
        check_choice("MetaOptNet", "solver_dtype", solver_dtype, SolverDtype)
        check_number("MetaOptNet", C=C, ridge_lambda=ridge_lambda, scale=scale)
        check_whole("MetaOptNet", solver_iters=solver_iters, solver_iters_eval=solver_iters_eval)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1); the paper uses 0.1")
        super().__init__(backbone if backbone is not None else Conv4(), optimizer, lr_scheduler)
        self.head, self.C, self.ridge_lambda = head, float(C), float(ridge_lambda)
        self.solver_iters, self.solver_iters_eval = solver_iters, solver_iters_eval
        self.label_smoothing, self.solver_dtype = float(label_smoothing), solver_dtype
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn_scale)
        self.wants_channels_last = channels_last_argument("MetaOptNet", channels_last, True)

    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        support, query = embed_episode(self.backbone, batch)
        dtype = _DTYPES[self.solver_dtype]
        ways = episode_ways(batch)
        # The QP is ill-conditioned near its optimum (multipliers over slacks span 1/eps..eps), so
        # the kernel, the solve and the scores stay in solver_dtype whatever autocast does.
        with solver_precision(support):
            s, q = support.to(dtype), query.to(dtype)
            kernel = s @ s.transpose(1, 2)
            if self.head == "svm":
                iterations = self.solver_iters if self.training else self.solver_iters_eval
                alpha = crammer_singer_svm(kernel, batch.support_y, ways, self.C, iterations, dtype=dtype).alpha
            else:
                alpha = kernel_ridge(kernel, batch.support_y, ways, self.ridge_lambda, dtype=dtype)
            logits = self.scale.to(dtype) * ((q @ s.transpose(1, 2)) @ alpha)
        return logits.to(support.dtype)

    def query_loss(self, predictions: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        """Cross-entropy, label-smoothed in training as in Lee et al.'s ``train.py`` when ``label_smoothing`` > 0."""
        ways = predictions.shape[-1]
        if not self.training or self.label_smoothing == 0 or target.is_floating_point() or ways < 2:
            return EpisodicModule.query_loss(predictions, target)
        eps = self.label_smoothing
        log_p = F.log_softmax(at_least_float32(predictions), -1)
        smoothed = torch.full_like(log_p, eps / (ways - 1)).scatter_(-1, target.unsqueeze(-1), 1 - eps)
        return -(smoothed * log_p).sum(-1).mean(1)


def lr_schedule(epoch: int) -> float:
    """Lee et al.'s learning-rate factor for ``LambdaLR`` (section 4.1): lr 0.1 becomes 0.006, 0.0012, 0.00024.

    The cuts come at epochs 20, 40 and 50.

    Name it in a config as ``lr_lambda: lightning_meta.algorithms.metaoptnet.lr_schedule``.
    """
    return 1.0 if epoch < 20 else 0.06 if epoch < 40 else 0.012 if epoch < 50 else 0.0024
