"""The precision default: bf16-mixed only where the hardware runs bf16 fast, logged, and overridable."""

import logging
from pathlib import Path

import pytest
import yaml

from lightning_meta import precision
from lightning_meta.cli import make_cli
from lightning_meta.precision import default_precision

REPO = Path(__file__).resolve().parents[1]
SINUSOID = str(REPO / "configs" / "maml" / "sinusoid.yaml")


@pytest.mark.parametrize("units, expected", [("AMX", "bf16-mixed"), ("AVX-512 BF16", "bf16-mixed"), (None, "32-true")])
def test_cpu_default_follows_the_bf16_instructions(monkeypatch, units, expected):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: units)
    choice = default_precision("cpu")
    assert choice.precision == expected
    assert (f"with {units}" if units else "without AMX or AVX-512 BF16") in choice.reason


def test_gpu_default_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    for supported, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(precision.torch.cuda, "is_bf16_supported", lambda *a, s=supported: s)
        assert default_precision("gpu").precision == expected
    assert precision.resolve_accelerator("cuda") == "cuda" and precision.resolve_accelerator("cpu") == "cpu"


@pytest.mark.parametrize("amx", [True, False])
def test_cli_resolves_an_unset_precision_and_logs_it(monkeypatch, caplog, amx):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AMX" if amx else None)
    with caplog.at_level(logging.INFO):
        cli = make_cli(["--config", SINUSOID, "--trainer.accelerator", "cpu", "--trainer.logger", "false"], run=False)
    expected = "bf16-mixed" if amx else "32-true"
    assert cli.trainer.precision == expected
    assert f"lightning-meta: precision {expected}" in caplog.text


def test_an_explicit_precision_wins(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AMX")
    args = ["--config", SINUSOID, "--trainer.accelerator", "cpu", "--trainer.logger", "false"]
    assert make_cli([*args, "--trainer.precision", "32"], run=False).trainer.precision == "32-true"
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: None)
    assert make_cli([*args, "--trainer.precision", "bf16-mixed"], run=False).trainer.precision == "bf16-mixed"


def test_no_shipped_config_pins_bf16():
    """A pinned bf16-mixed runs 1.4-1.6x slower than fp32 on CPUs without bf16 instructions (issue 15's figures)."""
    pinned = [
        str(p.relative_to(REPO))
        for p in sorted((REPO / "configs").rglob("*.yaml"))
        if str((yaml.safe_load(p.read_text()).get("trainer") or {}).get("precision", "")).startswith("bf16")
    ]
    assert not pinned, pinned
