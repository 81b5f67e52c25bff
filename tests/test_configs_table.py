"""Tables in library code that mirror the shipped configs stay equal to them (library code never reads configs/)."""

from pathlib import Path

import yaml

from lightning_meta.callbacks import SHIPPED_INNER_LR

REPO = Path(__file__).resolve().parents[1]


def test_divergence_guard_table_matches_the_shipped_configs() -> None:
    for (model, data), (config, inner_lr) in SHIPPED_INNER_LR.items():
        settings = yaml.safe_load((REPO / config).read_text())
        assert settings["model"]["class_path"].split(".")[-1] == model, config
        assert settings["data"]["class_path"].split(".")[-1] == data, config
        assert settings["model"]["init_args"]["inner_lr"] == inner_lr, config
    assert ("MAML", "Sinusoid") in SHIPPED_INNER_LR


def test_library_code_does_not_read_the_repository_configs() -> None:
    for package in ("lightning_meta", "datamodules"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            assert '/ "configs"' not in text and "'configs'" not in text, f"{path} reads the repository's configs/"
