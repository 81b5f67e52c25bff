"""The precision that is fast on this machine: bf16-mixed where the hardware runs bf16 fast, else 32.

Few-shot training is dominated by small matrix products. bf16-mixed runs them faster than fp32 on
a CPU with bf16 matrix instructions (AMX tiles on Intel Xeon since Sapphire Rapids, AVX-512 BF16 on
AMD Zen 4 and later and on Cooper Lake) and on a GPU with bf16 support; on a CPU without them
(most laptops, AMD Zen 3 and older, most Xeons before Sapphire Rapids) bf16 is emulated and slower
than fp32 (``benchmarks/RESULTS.md``, "precision default"). The
configs therefore leave ``trainer.precision`` unset and the ``lightning-meta`` command resolves it
with :func:`default_precision`, logging what it chose; ``--trainer.precision`` overrides it. In
your own scripts: ``Trainer(precision=default_precision())``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor


class PrecisionChoice(NamedTuple):
    """What :func:`default_precision` chose and why (shown in the CLI's log)."""

    precision: str
    reason: str


@functools.cache
def cpu_bf16_units() -> str | None:
    """This CPU's bf16 matrix instructions: ``"AMX"``, ``"AVX-512 BF16"`` or None (bf16 is emulated).

    From torch's own AMX check and the ``amx_bf16`` / ``avx512_bf16`` flags of ``/proc/cpuinfo``.
    """
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        if check is not None and check():
            return "AMX"
    except RuntimeError:
        pass
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX-512 BF16" if "avx512_bf16" in flags else None


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

    ``"bf16-mixed"`` on a CUDA GPU that supports bf16 and on a CPU with AMX or AVX-512 BF16;
    ``"32-true"`` on a CPU without them (where bf16 is slower than fp32), on a GPU without bf16
    and on Apple's MPS.

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
    units = cpu_bf16_units()
    if units is not None:
        return PrecisionChoice("bf16-mixed", f"CPU with {units} bf16 instructions")
    return PrecisionChoice("32-true", "CPU without AMX or AVX-512 BF16, where bf16 is slower than fp32")


def solver_precision(x: Tensor) -> torch.autocast:
    """Autocast off on ``x``'s device: the region where a closed-form or iterative solver runs in float32 (or float64).

    Numerics, not device code: linear solves are not autocast-safe, and bf16 Gram matrices or head
    fits would feed the solver rounding noise. R2-D2's ridge head and the baselines' episode heads use it.
    """
    return torch.autocast(x.device.type, enabled=False)
