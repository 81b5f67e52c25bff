"""Per-task batch norm (MAML's transductive batch norm) and the conversion of any backbone to it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_EXACT_UNDER_VMAP: ContextVar[bool] = ContextVar("_EXACT_UNDER_VMAP", default=False)


@contextmanager
def vmap_safe_batch_norm() -> Iterator[None]:
    """Within this context :class:`TaskBatchNorm2d` computes with ``torch.var_mean`` (see there)."""
    token = _EXACT_UNDER_VMAP.set(True)
    try:
        yield
    finally:
        _EXACT_UNDER_VMAP.reset(token)


class TaskBatchNorm2d(nn.Module):
    """Batch norm that always normalises with the statistics of the batch it is given (no running stats).

    This is MAML's transductive batch norm: each task is normalised by its own support or query
    batch. It uses the fused ``F.batch_norm``, except inside :func:`vmap_safe_batch_norm` (which
    the algorithms enter around ``torch.func.vmap``): there ``F.batch_norm`` gives wrong
    second-order gradients (torch 2.14), so the statistics come from ``torch.var_mean``, in float32
    under autocast.

    Args:
        num_features: channels.
        eps: added to the variance, as in ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if not _EXACT_UNDER_VMAP.get():
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        var, mean = torch.var_mean(x32, dim=(0, 2, 3), keepdim=True, correction=0)
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)).to(x.dtype)


def batch_norm_2d(num_features: int, track_running_stats: bool = True) -> nn.Module:
    """``nn.BatchNorm2d`` with running statistics, or :class:`TaskBatchNorm2d` (per task, for MAML) without."""
    return nn.BatchNorm2d(num_features) if track_running_stats else TaskBatchNorm2d(num_features)


def _to_task_norm(norm: nn.modules.batchnorm._BatchNorm) -> TaskBatchNorm2d:
    new = TaskBatchNorm2d(norm.num_features, eps=norm.eps)
    if norm.weight is not None and norm.bias is not None:
        new.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=norm.weight.requires_grad)
        new.bias = nn.Parameter(norm.bias.detach().clone(), requires_grad=norm.bias.requires_grad)
    elif norm.running_mean is not None:
        new.to(norm.running_mean.device)
    return new


def task_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a :class:`TaskBatchNorm2d`, keeping its weight and bias.

    This is what MAML needs from a backbone built with ordinary batch norm (a timm or torchvision
    network, for instance): every task is normalised with its own statistics and nothing is
    shared across tasks (Finn et al. 2017, section 5.2). Running statistics are dropped; a batch
    norm without affine parameters gets fresh ones (ones and zeros). timm's ``BatchNormAct2d``
    becomes the task norm followed by its own dropout and activation.

    Modifies ``module`` in place and returns it (or the replacement, when ``module`` itself is a batch norm).

    Raises:
        TypeError: for a subclass of ``nn.BatchNorm2d`` with its own forward that cannot be converted.
    """
    if isinstance(module, nn.BatchNorm2d | nn.SyncBatchNorm):
        return _convert(module)
    for name, child in list(module.named_children()):
        setattr(module, name, task_batch_norm(child))
    return module


def _convert(norm: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    if type(norm) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return _to_task_norm(norm)
    act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
    if isinstance(act, nn.Module) and isinstance(drop, nn.Module):  # timm's BatchNormAct2d: norm, drop, act
        return nn.Sequential(_to_task_norm(norm), drop, act)
    raise TypeError(
        f"task_batch_norm cannot convert {type(norm).__qualname__}: it is a batch norm with its own forward; "
        "build the backbone with nn.BatchNorm2d or TaskBatchNorm2d instead"
    )
