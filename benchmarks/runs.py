"""Shared helper of the accuracy benchmarks: fit a config through the CLI, then test its best checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

from lightning_meta.cli import make_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fit_and_test(
    fit_config: str, test_configs: list[str], common: list[str], fit_args: list[str], test_episodes: int
) -> tuple[float, int, list[tuple[dict[str, float], float]]]:
    """Fit ``fit_config`` and test its best checkpoint under each of ``test_configs``.

    Returns the fit's wall time (s), its optimizer steps and, per test config, its test metrics
    (``test/acc``, ``test/acc_ci95``, ``test/loss``, ...) and wall time.
    """
    start = time.perf_counter()
    fit = make_cli(["fit", "--config", str(CONFIGS / fit_config), *common, *fit_args])
    fit_s = time.perf_counter() - start
    best = fit.trainer.checkpoint_callback.best_model_path
    results = []
    for config in test_configs:
        start = time.perf_counter()
        test = make_cli(
            ["test", "--config", str(CONFIGS / config), *common, "--data.test_episodes", str(test_episodes)]
            + ["--ckpt_path", best]
        )
        metrics = {k: v.item() for k, v in test.trainer.callback_metrics.items() if k.startswith("test/")}
        results.append((metrics, time.perf_counter() - start))
    return fit_s, fit.trainer.global_step, results
