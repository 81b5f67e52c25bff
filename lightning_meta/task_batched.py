"""Task-batched layers: the tasks of a meta-batch through one network call, each with its own weights.

Under :class:`TaskBatched` a network built from ordinary ``nn.Conv2d``, ``nn.Linear`` and
:class:`~lightning_meta.backbones.TaskBatchNorm2d` layers runs ``T`` tasks at once: the input is
``[T*B, ...]`` (task-major) and every parameter given to :func:`torch.func.functional_call` may
carry a leading task dimension ``[T, ...]`` (the weights each task has adapted to). The mode
rewrites just the three parametrised operations:

- a convolution with ``[T, O, C, k, k]`` weights becomes one grouped convolution over the tasks
  (``groups=T``) or, with ``conv="matmul"``, one batched matrix product over unfolded inputs;
- a linear layer with ``[T, O, D]`` weights becomes one ``baddbmm``;
- batch norm with batch statistics normalises each task by its own statistics (MAML's per-task
  batch norm), whether its weights are per task or shared.

Everything else (activations, pooling, reshapes, residual sums) already treats the ``T*B``
images as one batch. So the meta-batch costs a few large kernels per layer instead of ``T`` small
ones, and plain ``torch.autograd.grad`` of the summed task losses gives every task its own
gradient (tasks share no weights), to any order. :func:`check_task_batchable` says whether a
network is made of layers this mode understands.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .backbones.batchnorm import TaskBatchNorm2d

_TOGETHER: list[int] = []


@contextmanager
def tasks_together(tasks: int) -> Iterator[None]:
    """Within it, a per-task function is given ``tasks`` tasks at once (:func:`~lightning_meta.functional.map_tasks`).

    :func:`together` reads how many, as ``in_function_transform`` reads whether ``vmap`` runs: the
    caller of the function decides (its :class:`~lightning_meta.functional.TaskRunner`), not a flag on a module.
    """
    _TOGETHER.append(tasks)
    try:
        yield
    finally:
        _TOGETHER.pop()


def together() -> int | None:
    """The number of tasks the current per-task function is given at once, or None for one task."""
    return _TOGETHER[-1] if _TOGETHER else None


#: Layers whose parameters may carry a task dimension under :class:`TaskBatched`.
BATCHABLE = (nn.Conv2d, nn.Linear, TaskBatchNorm2d)


class TaskBatchingError(RuntimeError):
    """The network has a layer that :class:`TaskBatched` cannot run per task (use ``task_batching='loop'``)."""


def check_task_batchable(network: nn.Module, adapted: Iterable[str]) -> None:
    """Raise :class:`TaskBatchingError` unless ``network`` can run under :class:`TaskBatched`.

    Every module holding an adapted parameter must be a ``nn.Conv2d`` (zero padding, no dilation
    tricks needed), ``nn.Linear`` or :class:`~lightning_meta.backbones.TaskBatchNorm2d`; a batch norm
    that keeps running statistics must be in eval mode (in training it would mix the tasks' statistics).
    """
    adapted = set(adapted)
    for name, module in network.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            raise TaskBatchingError(
                f"task_batching='batched' cannot update the running statistics of {name} ({type(module).__name__}) "
                "per task; build the backbone with TaskBatchNorm2d (track_running_stats=False) or use 'loop'"
            )
        own = {f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)}
        if own & adapted and not isinstance(module, BATCHABLE):
            raise TaskBatchingError(
                f"task_batching='batched' cannot adapt {type(module).__name__} ({name}) per task; it knows "
                "nn.Conv2d, nn.Linear and TaskBatchNorm2d; use task_batching='loop' or 'vmap'"
            )
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise TaskBatchingError(f"task_batching='batched' needs zero padding; {name} has {module.padding_mode!r}")


def expand_tasks(params: dict[str, Tensor], tasks: int) -> dict[str, Tensor]:
    """Every parameter with a leading task dimension of size ``tasks`` (views: no copy, gradients sum back).

    Under ``torch.no_grad`` (Lightning's validation) the views are of detached parameters: a view of a
    parameter made there still says ``requires_grad`` but is cut from autograd, so the inner loop's
    gradients with respect to it would come back as zeros and evaluation would not adapt.
    """
    grad = torch.is_grad_enabled()
    return {name: (p if grad else p.detach()).expand(tasks, *p.shape) for name, p in params.items()}


class TaskBatched(TorchFunctionMode):
    """A function mode in which ``T`` tasks run through one call of a network (see the module docstring).

    Args:
        tasks: ``T``; inputs are ``[T*B, ...]``, task-major.
        conv: ``"grouped"`` (one grouped convolution) or ``"matmul"`` (unfold and one ``bmm``).
    """

    def __init__(self, tasks: int, conv: Literal["grouped", "matmul"] = "grouped") -> None:
        super().__init__()
        if conv not in ("grouped", "matmul"):
            raise ValueError(f"conv={conv!r} must be 'grouped' or 'matmul'")
        self.tasks, self.conv = tasks, conv

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.conv2d:
            return self._conv2d(*args, **kwargs)
        if func is F.linear:
            return self._linear(*args, **kwargs)
        if func is F.batch_norm:
            return self._batch_norm(*args, **kwargs)
        return func(*args, **kwargs)

    # ------------------------------------------------------------------ the three rewritten operations
    def _split(self, x: Tensor) -> Tensor:
        if x.shape[0] % self.tasks:
            raise TaskBatchingError(f"a batch of {x.shape[0]} does not split into {self.tasks} tasks")
        return x.view(self.tasks, x.shape[0] // self.tasks, *x.shape[1:])

    def _conv2d(
        self, x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
        dilation: Any = 1, groups: int = 1,
    ) -> Tensor:  # fmt: skip
        if weight.dim() == 4:
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        tasks = self.tasks
        if self.conv == "matmul" and groups == 1:
            return self._conv2d_matmul(x, weight, bias, stride, padding, dilation)
        per_task = self._split(x)  # [T, B, C, H, W] -> [B, T*C, H, W]
        batch = per_task.shape[1]
        stacked = per_task.transpose(0, 1).reshape(batch, tasks * x.shape[1], *x.shape[2:])
        w = weight.reshape(tasks * weight.shape[1], *weight.shape[2:])
        b = None if bias is None else bias.reshape(-1)
        out = F.conv2d(stacked, w, b, stride, padding, dilation, groups * tasks)
        out = out.view(batch, tasks, -1, *out.shape[2:]).transpose(0, 1)
        return out.reshape(tasks * batch, *out.shape[2:])

    def _conv2d_matmul(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any
    ) -> Tensor:
        tasks, out_channels, kh, kw = weight.shape[0], weight.shape[1], weight.shape[-2], weight.shape[-1]
        h, w = x.shape[-2:]
        pair = torch.nn.modules.utils._pair
        (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
        out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))  # [T*B, C*k*k, L]
        per_task = self._split(cols)  # [T, B, Ckk, L]
        batch = per_task.shape[1]
        cols = per_task.transpose(1, 2).reshape(tasks, per_task.shape[2], batch * out_h * out_w)
        flat_w = weight.reshape(tasks, out_channels, -1)
        out = torch.bmm(flat_w, cols) if bias is None else torch.baddbmm(bias.unsqueeze(-1), flat_w, cols)
        out = out.view(tasks, out_channels, batch, out_h, out_w).transpose(1, 2)
        return out.reshape(tasks * batch, out_channels, out_h, out_w)

    def _linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if weight.dim() == 2:
            return F.linear(x, weight, bias)
        per_task = self._split(x)  # [T, B, ..., D]
        flat = per_task.reshape(self.tasks, -1, x.shape[-1])
        out = (
            torch.bmm(flat, weight.transpose(1, 2))
            if bias is None
            else torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
        )
        return out.reshape(*x.shape[:-1], weight.shape[1])

    def _batch_norm(
        self, x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
        bias: Tensor | None = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
    ) -> Tensor:  # fmt: skip
        uses_batch_statistics = training or running_mean is None
        if not uses_batch_statistics:
            if weight is not None and weight.dim() > 1:
                raise TaskBatchingError("per-task batch-norm weights with running statistics are not supported")
            return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        if running_mean is not None:
            raise TaskBatchingError("batch norm that updates running statistics cannot run tasks together")
        tasks, channels = self.tasks, x.shape[1]
        per_task = self._split(x)  # [T, B, C, ...] -> [B, T*C, ...]: one channel per task and channel
        batch = per_task.shape[1]
        stacked = per_task.transpose(0, 1).reshape(batch, tasks * channels, *x.shape[2:])

        def per_channel(p: Tensor | None) -> Tensor | None:
            return None if p is None else (p if p.dim() > 1 else p.expand(tasks, channels)).reshape(-1)

        out = F.batch_norm(stacked, None, None, per_channel(weight), per_channel(bias), True, momentum, eps)
        out = out.view(batch, tasks, channels, *x.shape[2:]).transpose(0, 1)
        return out.reshape(x.shape)
