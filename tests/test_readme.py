"""The README's code must run as written."""

import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl

from datamodules import Omniglot

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_subclass_example_trains(fake_omniglot):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README lost its subclassing example"
    namespace: dict = {}
    exec(blocks[0], namespace)
    model = namespace["NearestNeighbour"]()
    dm = Omniglot(root=str(fake_omniglot), ways=2, shots=2, queries=3, rotations=False, val_episodes=4)
    trainer = pl.Trainer(fast_dev_run=2, logger=False, enable_progress_bar=False)
    trainer.fit(model, dm)
    assert 0 <= trainer.callback_metrics["val/acc"] <= 1


def test_readme_quick_start_names_real_files():
    quick_start = README.split("## Quick start")[1].split("\n## ")[0]
    for config in re.findall(r"--config (\S+)", quick_start):
        assert (Path(__file__).resolve().parents[1] / config).exists(), config


def test_importing_the_packages_does_not_import_learn2learn():
    code = "import sys, lightning_meta, datamodules, lightning_meta.cli; assert 'learn2learn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
