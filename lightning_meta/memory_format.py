"""Channels-last memory format on the Trainer's side: a callback, not a module's constructor argument.

Convolutions on CPU (oneDNN) and on recent GPUs run faster on channels-last tensors for some models
(``benchmarks/RESULTS.md``). A convolution picks its output format from its input *or* its weight,
so converting the module's 4-d weights once is enough: every activation after the first
convolution is then channels-last, and no batch needs converting. Memory format is the Trainer's
business (like devices and precision), so it is a callback::

    lightning-meta fit --config configs/r2d2/omniglot_5w1s.yaml --trainer.callbacks+=ChannelsLast

Modules that were measured faster with it (ProtoNet, MatchingNet, MetaOptNet, R2-D2, the
pre-train + fine-tune baselines, MetaNetwork) ask for it themselves through ``configure_callbacks``
(:func:`channels_last_callbacks`); the gradient-based ones do not (channels-last kernels round
differently with the thread count and the inner loop amplifies it).
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn


class ChannelsLast(pl.Callback):
    """Put the module's 4-d weights (convolutions) in the channels-last memory format when a run starts."""

    @staticmethod
    def convert(module: nn.Module) -> nn.Module:
        """Convert ``module``'s 4-d parameters and buffers to channels-last, in place; returns it."""
        return module.to(memory_format=torch.channels_last)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.convert(pl_module)


def channels_last_argument(owner: str, value: bool | None, default: bool) -> bool:
    """The deprecated ``channels_last`` constructor argument: ``value`` if given (with a warning), else ``default``."""
    if value is None:
        return default
    warnings.warn(
        f"{owner}: channels_last={value} is deprecated and will be removed; leave it out (default "
        f"{'on' if default else 'off'}) and add the ChannelsLast callback (--trainer.callbacks+=ChannelsLast) to turn "
        "it on",
        DeprecationWarning,
        stacklevel=3,
    )
    return bool(value)


def channels_last_callbacks(module: Any, callbacks: Any) -> Any:
    """``configure_callbacks`` of a module: ``callbacks``, and :class:`ChannelsLast` if it ``wants_channels_last``."""
    if not getattr(module, "wants_channels_last", False):
        return callbacks
    return [*(callbacks if isinstance(callbacks, list | tuple) else [callbacks]), ChannelsLast()]
