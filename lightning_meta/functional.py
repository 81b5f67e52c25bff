"""The inner loop shared by every gradient-based method: free functions, no callbacks into modules."""

from __future__ import annotations


def adaptation_curve_steps(total: int) -> list[int]:
    """Inner steps where the adaptation curve is measured: all up to 10, else 0, the powers of 2 and ``total``."""
    if total <= 10:
        return list(range(total + 1))
    return [0, *(2**i for i in range(total.bit_length()) if 2**i < total), total]
