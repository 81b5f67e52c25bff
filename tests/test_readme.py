"""The README's code must run as written: its Python blocks, its CLI commands' keys, the short-name example."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from episode_factory import make_episodes

from datamodules import Omniglot
from lightning_meta import MAML, ProtoNet
from lightning_meta.cli import make_cli

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SCRIPT = Path(sys.executable).parent / "lightning-meta"


def python_blocks() -> dict:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 5, "the README lost its Python examples"
    namespace: dict = {}
    for block in blocks:
        exec(block, namespace)  # the functional example asserts its own meta-gradient
    return namespace


def commands() -> list[list[str]]:
    """Every ``lightning-meta`` command in the README's bash blocks, continuation lines joined."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line)
            if "lightning-meta" in words:
                found.append(words[words.index("lightning-meta") + 1 :])
    return found


def test_readme_subclass_example_trains(fake_omniglot):
    model = python_blocks()["NearestNeighbour"]()
    dm = Omniglot(root=str(fake_omniglot), ways=2, shots=2, queries=3, rotations=False, val_episodes=4)
    trainer = pl.Trainer(fast_dev_run=2, logger=False, enable_progress_bar=False)
    trainer.fit(model, dm)
    assert 0 <= trainer.callback_metrics["val/acc"] <= 1


def test_readme_anil_backbone_and_inner_optimizer_examples_take_a_training_step():
    namespace = python_blocks()
    batch = make_episodes(tasks=2, ways=5, shots=1, queries=2, shape=(1, 28, 28))
    anil = namespace["HeadOnlyMAML"]().train()
    before = {n: p.detach().clone() for n, p in anil.named_parameters()}
    anil.training_step(batch, 0).backward()
    assert all(p.grad is not None for p in anil.parameters())  # the body is meta-learned too
    assert list(anil.adapt_params()) == ["head.weight", "head.bias"]
    assert all(torch.equal(before[n], p) for n, p in anil.named_parameters())
    tiny = ProtoNet(namespace["TinyNet"]())
    tiny.training_step(batch, 0).backward()
    sign = MAML(namespace["TinyNet"](), head=torch.nn.Linear(32, 5), inner_optimizer=namespace["SignSGD"](0.01))
    sign.training_step(batch, 0).backward()
    assert sign.head.weight.grad is not None


def test_readme_quick_start_names_real_files():
    quick_start = README.split("## Quick start")[1].split("\n## ")[0]
    for config in re.findall(r"--config (\S+)", quick_start):
        assert (REPO / config).exists(), config


def test_readme_relative_links_and_pictures_exist():
    targets = re.findall(r"\]\(([^)#\s]+)\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert any(t.endswith(".png") for t in local), "the README lost its pictures"
    for target in local:
        assert (REPO / target).exists(), target


@pytest.mark.parametrize("words", [c for c in commands() if c[0] in ("fit", "test", "validate")], ids=" ".join)
def test_readme_cli_commands_parse(words, tmp_path, monkeypatch, capsys):
    """Every fit/test command's config exists and every key it sets is accepted (nothing is run)."""
    monkeypatch.chdir(tmp_path)
    for i, word in enumerate(words):
        if word == "--config":
            words[i + 1] = str(REPO / words[i + 1])
            assert Path(words[i + 1]).exists(), words[i + 1]
    words = [w for w in words if w not in ("best", "last")]
    words = [w for w in words if w != "--ckpt_path"]
    with pytest.raises(SystemExit) as done:
        make_cli([*words, "--print_config"])
    assert done.value.code in (0, None), capsys.readouterr().err


def test_readme_predict_command_has_the_documented_options():
    predict = [c for c in commands() if c[0] == "predict"]
    assert predict, "the README lost its predict command"
    out = subprocess.run([str(SCRIPT), "predict", "--help"], capture_output=True, text=True, timeout=120)
    for option in (w for w in predict[0] if w.startswith("--")):
        assert option in out.stdout, option


def test_readme_short_name_sinusoid_command_learns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    words = next(c for c in commands() if "--model" in c and "Sinusoid" in c)
    cli = make_cli([*words, "--trainer.enable_progress_bar", "false"])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 5
    # Meta-learned: three inner steps of lr 0.01 halve the query loss of the learned initialisation
    # (measured 3.34 -> 1.78); with the default inner_lr 0.4 the run diverged to 6e16.
    assert metrics["val/loss"] < 0.7 * metrics["val_adapt/loss_step_0"], metrics


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_readme_sinusoid_command_with_the_default_inner_lr_stops_with_an_error_naming_it(precision, tmp_path):
    # The README: "MAML's `inner_lr: 0.4` diverges on sinusoid regression [...], and the run then stops
    # with an error that names `inner_lr`". Its command without `--model.inner_lr 0.01`, task batching
    # left to `auto` and the precision given both ways (bf16-mixed is the default on CPUs with AMX).
    assert "and the run then stops with an error that names `inner_lr`" in " ".join(README.split())
    words = next(c for c in commands() if "--model" in c and "Sinusoid" in c)
    at = words.index("--model.inner_lr")
    words = [*words[:at], *words[at + 2 :], "--trainer.max_epochs", "2"]
    command = [str(SCRIPT), *words, "--trainer.enable_progress_bar", "false", "--trainer.precision", precision]
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_META_DEBUG"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("lightning-meta: error:")]
    assert len(errors) == 1 and "training diverged" in errors[0], done.stderr[-3000:]
    assert "MAML's inner_lr=0.4 is likely too large for this data; configs/maml/sinusoid.yaml uses 0.01" in errors[0]
    assert not list(tmp_path.rglob("interrupted.ckpt"))  # a diverged model is not saved for resuming


def test_importing_the_packages_does_not_import_learn2learn():
    code = "import sys, lightning_meta, datamodules, lightning_meta.cli; assert 'learn2learn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
