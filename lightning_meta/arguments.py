"""Checks of constructor arguments, shared so that a method states its ranges in one line.

LightningCLI checks a ``Literal[...]`` annotation itself; these checks give the same clear
``ValueError`` (the owner, the parameter, the value and what is allowed) to a module built in
Python, and cover the ranges an annotation cannot state.
"""

from __future__ import annotations

import math
from typing import Any, get_args


def check_choice(owner: str, name: str, value: Any, choices: Any) -> None:
    """Raise ValueError unless ``value`` is one of ``choices`` (a ``Literal[...]`` type or a sequence)."""
    allowed = list(get_args(choices) or choices)
    if value not in allowed:
        raise ValueError(f"{owner}: {name}={value!r} must be one of {allowed}")


def check_whole(owner: str, minimum: int = 1, **values: Any) -> None:
    """Raise ValueError unless every value is a whole number (not a bool) of at least ``minimum``."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{owner}: {name}={value!r} must be a whole number of {minimum} or more")


def check_number(owner: str, *, zero_ok: bool = False, **values: Any) -> None:
    """Raise ValueError unless every value is a finite number above 0 (or 0 and more, with ``zero_ok``)."""
    for name, value in values.items():
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < 0 or (value == 0 and not zero_ok):
            bound = "0 or more" if zero_ok else "above 0"
            raise ValueError(f"{owner}: {name}={value!r} must be a finite number {bound}")
