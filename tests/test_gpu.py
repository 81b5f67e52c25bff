"""Every registered module's fit and test on an accelerator, in each precision Lightning offers there.

The accelerator comes from ``LIGHTNING_META_TEST_ACCELERATOR`` (``gpu`` or ``cpu``). Unset, these tests
run on the GPU when ``torch.cuda.is_available()`` and are skipped otherwise (CI has no GPU: the only skip
in this file). ``LIGHTNING_META_TEST_ACCELERATOR=cpu`` runs the very same tests on the CPU, which is how
``benchmarks/gpu_check.sh --device cpu`` tests the GPU check itself without a GPU.

Parametrised over ``MODULES`` (tests/test_integration.py), so a newly registered algorithm is covered here
without an edit.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from lightning.pytorch import Callback
from test_integration import MODULES, build

ENV = "LIGHTNING_META_TEST_ACCELERATOR"
PRECISIONS = ["32", "bf16-mixed", "16-mixed"]
# What each accelerator runs for real. Lightning replaces 16-mixed on the CPU by bf16-mixed with a
# warning (AMP with fp16 is not supported on CPU: accelerator_connector.py), so running it there would
# test bf16-mixed a second time under the wrong name.
SUPPORTED = {"gpu": {"32", "bf16-mixed", "16-mixed"}, "cpu": {"32", "bf16-mixed"}}


def accelerator() -> str | None:
    """The accelerator these tests run on, or None to skip them."""
    value = os.environ.get(ENV)
    if value is None:
        return "gpu" if torch.cuda.is_available() else None
    if value not in SUPPORTED:
        raise ValueError(f"{ENV}={value!r}: use one of {sorted(SUPPORTED)} (or unset it to use a GPU if present)")
    return value


ACCELERATOR = accelerator()
pytestmark = pytest.mark.skipif(
    ACCELERATOR is None, reason=f"no CUDA GPU (set {ENV}=cpu to run these tests on the CPU)"
)
if ACCELERATOR == "gpu" and not torch.cuda.is_available():
    raise RuntimeError(f"{ENV}=gpu but torch.cuda.is_available() is False (torch {torch.__version__})")


def device_args(precision: str) -> list[str]:
    common = ["--trainer.accelerator", ACCELERATOR, "--trainer.devices", "1", "--trainer.precision", precision]
    return [*common, "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def skip_unsupported(precision: str) -> None:
    if precision not in SUPPORTED[ACCELERATOR]:
        pytest.skip(f"{precision} is not supported on {ACCELERATOR} (Lightning would silently run bf16-mixed)")


class StepLosses(Callback):
    """Each training step's loss, as the LightningModule returned it."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:  # manual optimisation returns nothing: take the logged value
            loss = trainer.callback_metrics["train/loss"]
        self.losses.append(float(loss.detach().float()))


def fit_and_test(name: str, cache: dict, extra: list[str]) -> tuple[dict, dict, torch.nn.Module, StepLosses]:
    model, dm, trainer = build(name, cache, extra)
    losses = StepLosses()
    trainer.callbacks.append(losses)
    trainer.fit(model, dm)
    fitted = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tested = trainer.test(model, dm, verbose=False)[0]
    return fitted, tested, model, losses


def expected_device_type() -> str:
    return "cuda" if ACCELERATOR == "gpu" else "cpu"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", MODULES)
def test_fit_and_test_on_the_accelerator(name, precision, omniglot_cache, tmp_path, monkeypatch):
    skip_unsupported(precision)
    monkeypatch.chdir(tmp_path)
    extra = [*MODULES[name].small, *device_args(precision), "--data.val_episodes", "2", "--data.test_episodes", "2"]
    extra += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    fitted, tested, model, losses = fit_and_test(name, omniglot_cache, extra)
    assert {p.device.type for p in model.parameters()} == {expected_device_type()}
    assert len(losses.losses) == 2 and all(math.isfinite(x) for x in losses.losses), losses.losses
    assert math.isfinite(fitted["train/loss"]), fitted
    assert 0.0 <= tested["test/acc"] <= 1.0, tested
    assert math.isfinite(tested["test/loss"]), tested


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_second_order_maml_in_mixed_precision_has_no_nans(precision, omniglot_cache, tmp_path, monkeypatch):
    """fp16 autocast through MAML's double backward: losses and parameters stay finite and the steps happen.

    The loss scaler may skip a step whose gradients overflow; at least one of the steps must go through,
    or finite parameters would prove nothing.
    """
    skip_unsupported(precision)
    monkeypatch.chdir(tmp_path)
    steps = 6
    extra = ["--model.first_order", "false", "--data.tasks_per_batch", "4", *device_args(precision)]
    extra += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(steps)]
    extra += ["--trainer.limit_val_batches", "1", "--data.val_episodes", "2", "--data.test_episodes", "2"]
    model, dm, trainer = build("MAML", omniglot_cache, extra)
    assert model.first_order is False
    before = [p.detach().clone() for p in model.parameters()]
    losses = StepLosses()
    trainer.callbacks.append(losses)
    trainer.fit(model, dm)
    assert len(losses.losses) == steps and all(math.isfinite(x) for x in losses.losses), losses.losses
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after), "a parameter became NaN or inf"
    assert any(not torch.equal(b.to(a.device), a.detach()) for b, a in zip(before, after, strict=True)), (
        "no step was taken"
    )
    tested = trainer.test(model, dm, verbose=False)[0]
    assert math.isfinite(tested["test/loss"]) and 0.0 <= tested["test/acc"] <= 1.0, tested
