"""Registry of tiny fake datasets for the config tests, one entry per datamodule class name.

Each entry takes a writable folder and returns the extra command-line arguments (``--data.root``
and similar) that point the config's datamodule at a tiny dataset written there in the real
on-disk layout. A new bundle adds one function here with ``@fake_data("ClassName")``; every
config that uses the bundle is then run by ``tests/test_cli.py``.

The fake data must be big enough for the bundle's configs after ``small_args`` shrinks them:
configs are run with ``--data.tasks_per_batch 2`` and whatever the entry returns.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

FAKE_DATA: dict[str, Callable[[Path], list[str]]] = {}


def fake_data(name: str) -> Callable[[Callable[[Path], list[str]]], Callable[[Path], list[str]]]:
    """Register a function that writes fake data for datamodule ``name`` and returns CLI arguments."""

    def register(make: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
        FAKE_DATA[name] = make
        return make

    return register


# Bundles add their entries below this line.
