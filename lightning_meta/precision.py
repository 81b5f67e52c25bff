"""The precision that is fast on this machine: bf16-mixed where the hardware runs bf16 fast, else 32.

Few-shot training is dominated by small matrix products. bf16-mixed runs them several times faster
than fp32 on a CPU with AMX matrix units (Intel Xeon since Sapphire Rapids) and on a GPU with bf16
support, but on a CPU without AMX (most laptops, AMD EPYC and Ryzen, older Xeons) bf16 is emulated or
half-accelerated and slower than fp32 (``benchmarks/RESULTS.md``, "precision default"). The
configs therefore leave ``trainer.precision`` unset and the ``lightning-meta`` command resolves it
with :func:`default_precision`, logging what it chose; ``--trainer.precision`` overrides it. In
your own scripts: ``Trainer(precision=default_precision())``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import torch


class PrecisionChoice(NamedTuple):
    """What :func:`default_precision` chose and why (shown in the CLI's log)."""

    precision: str
    reason: str


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bf16 matrix units (torch's own check, else ``/proc/cpuinfo``'s ``amx_bf16`` flag)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if check is not None:
        try:
            if check():
                return True
        except RuntimeError:
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags.split()


def resolve_accelerator(accelerator: object = "auto") -> str:
    """``"cuda"``, ``"mps"`` or ``"cpu"``: where a Trainer with this ``accelerator`` argument would run."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__
    name = name.lower()
    if name in ("gpu", "cuda") or name.startswith("cuda"):
        return "cuda"
    if name.startswith("mps"):
        return "mps"
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
    return "cpu"


def default_precision(accelerator: object = "auto") -> PrecisionChoice:
    """The fast Trainer precision for ``accelerator`` on this machine, and the reason.

    ``"bf16-mixed"`` on a CUDA GPU that supports bf16 and on a CPU with AMX; ``"32-true"`` on a
    CPU without AMX (where bf16 is slower than fp32), on a GPU without bf16 and on Apple's MPS.

    Args:
        accelerator: the Trainer's ``accelerator`` argument (``"auto"``, ``"cpu"``, ``"gpu"``, ...).
    """
    device = resolve_accelerator(accelerator)
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16-mixed", f"GPU {torch.cuda.get_device_name()} supports bf16")
        return PrecisionChoice("32-true", f"GPU {torch.cuda.get_device_name()} has no bf16 support")
    if device == "mps":
        return PrecisionChoice("32-true", "Apple MPS")
    if cpu_has_amx():
        return PrecisionChoice("bf16-mixed", "CPU with AMX bf16 matrix units")
    return PrecisionChoice("32-true", "CPU without AMX, where bf16 is slower than fp32")
