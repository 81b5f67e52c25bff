"""The ``lightning-meta`` command's OpenMP thread policy, set before torch starts its thread pool.

torch's CPU kernels run on OpenMP threads that, by default, spin while they wait for work. On a
machine whose cores are busy with another process (two runs side by side on a laptop or a shared
server) the spinning threads take turns with the real work and a run becomes several times
slower (issue 29: the Quick start took 98.8 s instead of 49.3 s with ``OMP_WAIT_POLICY=PASSIVE``
on a busy 2-core CPU). The command therefore sets ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep
when idle) and keeps torch's thread count, unless the user chose: an ``OMP_WAIT_POLICY`` already
in the environment is kept, ``OMP_NUM_THREADS`` is never touched, and
``LIGHTNING_META_THREAD_POLICY=torch`` leaves torch's defaults alone. ``benchmarks/threads.py``
measures the choices.

OpenMP reads ``OMP_WAIT_POLICY`` once, when the library loads with ``import torch``; setting it
later has no effect. So :func:`apply_cli_policy` runs at the top of ``lightning_meta/__init__.py``,
which both ``python -m lightning_meta`` and the ``lightning-meta`` script import before anything
else, and acts only in those two commands (a user's own script that imports lightning_meta keeps
its environment). This module imports nothing but the standard library.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: The wait policy the command sets when the user did not choose one.
DEFAULT_WAIT_POLICY = "PASSIVE"
#: Set to ``torch`` to keep torch's and OpenMP's own defaults in the command.
POLICY_VARIABLE = "LIGHTNING_META_THREAD_POLICY"

#: What :func:`apply_cli_policy` did in this process: None (not the command, or torch was loaded
#: first), "user" (the environment chose), "torch" (opted out) or the policy it set.
applied: str | None = None


def is_cli(argv: list[str] | None = None, script: str | None = None) -> bool:
    """Whether this process is ``lightning-meta`` or ``python -m lightning_meta`` (``argv``: the interpreter's)."""
    argv = list(getattr(sys, "orig_argv", sys.argv)) if argv is None else argv
    script = sys.argv[0] if script is None else script
    if Path(script).name in ("lightning-meta", "lightning-meta.exe"):
        return True
    for i, word in enumerate(argv[1:], start=1):
        if word == "-m":
            return i + 1 < len(argv) and argv[i + 1] in ("lightning_meta", "lightning_meta.cli")
        if word.startswith("-m"):
            return word[2:] in ("lightning_meta", "lightning_meta.cli")
        if word == "-c" or not word.startswith("-"):
            return False  # python -c ... or python script.py
    return False


def apply_cli_policy() -> str | None:
    """Set ``OMP_WAIT_POLICY`` for the command if the user did not and torch is not loaded yet; see the module doc."""
    global applied
    if not is_cli() or "torch" in sys.modules:
        return None
    if os.environ.get(POLICY_VARIABLE, "").lower() == "torch":
        applied = "torch"
    elif "OMP_WAIT_POLICY" in os.environ:
        applied = "user"
    else:
        os.environ["OMP_WAIT_POLICY"] = applied = DEFAULT_WAIT_POLICY
    return applied


def describe() -> str:
    """One line for the command's log: the wait policy, torch's thread count, and how to choose."""
    import torch  # loaded by now; kept out of the module's imports, which must not load it

    policy = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP's default)")
    sources = {"user": "from the environment", "torch": f"{POLICY_VARIABLE}=torch", DEFAULT_WAIT_POLICY: "default"}
    source = sources.get(applied or "", "set only by the lightning-meta command")
    return (
        f"lightning-meta: OMP_WAIT_POLICY {policy} ({source}), torch threads: {torch.get_num_threads()}; "
        "set OMP_WAIT_POLICY / OMP_NUM_THREADS to choose"
    )
