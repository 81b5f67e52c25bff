"""The CLI's errors: one clear line for lightning-meta's own errors, and the cases that used to mislead."""

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_meta import Conv4, ProtoNet
from lightning_meta.callbacks import DivergenceError, DivergenceGuard
from lightning_meta.cli import main, make_cli

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "lightning-meta"
PROTONET = REPO / "configs" / "protonet" / "omniglot_5w1s.yaml"


def small_omniglot(root: Path) -> list[str]:
    """Arguments for quick fits of the Omniglot configs on the fake zips."""
    args = ["--data.root", str(root), "--data.rotations", "false", "--data.ways", "2", "--data.queries", "3"]
    args += ["--data.train_ways", "2", "--data.val_episodes", "2", "--data.test_episodes", "2"]
    return args + ["--trainer.enable_progress_bar", "false", "--trainer.precision", "32"]


def test_missing_data_root_is_one_line_and_status_2(tmp_path):
    command = [str(SCRIPT), "fit", "--config", str(PROTONET), "--data.root", str(tmp_path / "nowhere")]
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_META_DEBUG"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("lightning-meta: error:")]
    assert len(errors) == 1 and "Omniglot files not found" in errors[0] and "nowhere" in errors[0]
    assert "set LIGHTNING_META_DEBUG=1 for the traceback" in done.stderr
    assert "Traceback" not in done.stderr


def test_debug_variable_shows_the_original_exception(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_META_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="Omniglot files not found"):
        main(["fit", "--config", str(PROTONET), "--data.root", str(tmp_path / "nowhere")])


def test_a_checkpoint_of_another_algorithm_names_both_classes(fake_omniglot, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fit = make_cli(["fit", "--config", str(PROTONET), *small_omniglot(fake_omniglot), "--trainer.max_steps", "2"])
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(REPO / "configs" / "maml" / "omniglot_5w1s.yaml"), *small_omniglot(fake_omniglot),
              "--model.init_args.backbone.init_args.out_features", "2", "--data.tasks_per_batch", "1",
              "--model.init_args.task_batching", "loop", "--ckpt_path", str(ckpt)])  # fmt: skip
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-meta: error:")]
    assert len(errors) == 1
    assert "written by ProtoNet" in errors[0] and "the model is MAML" in errors[0]


def test_best_after_a_fit_that_never_validated_says_why_and_last_works(fake_omniglot, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(PROTONET), *small_omniglot(fake_omniglot)]
    # An epoch is 100 episodes: 3 steps end the fit before the first validation.
    fit = make_cli(["fit", *common, "--trainer.max_steps", "3"])
    run = Path(fit.trainer.log_dir)
    assert not list((run / "checkpoints").glob("best-*.ckpt")) and (run / "checkpoints" / "last.ckpt").exists()
    with pytest.raises(FileNotFoundError, match="has last.ckpt but no 'best-\\*.ckpt': no validation ran") as error:
        make_cli(["test", *common, "--ckpt_path", "best"])
    assert "max_steps" in str(error.value) and "--ckpt_path last" in str(error.value)
    assert "--data.train_episodes" in str(error.value)
    test = make_cli(["test", *common, "--ckpt_path", "last"])
    assert test.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    assert "test/acc" in test.trainer.callback_metrics


def test_fit_ckpt_path_last_resumes_the_newest_run(fake_omniglot, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["fit", "--config", str(PROTONET), *small_omniglot(fake_omniglot)]
    first = make_cli([*common, "--trainer.max_steps", "2"])
    resumed = make_cli([*common, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert resumed.trainer.ckpt_path == str(Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt")
    assert resumed.trainer.global_step == 4


class NaNAfter(ProtoNet):
    """A ProtoNet whose loss turns NaN from a given training step on."""

    def __init__(self, step: int) -> None:
        super().__init__(Conv4(hidden=8))
        self.nan_from = step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= self.nan_from else loss


def test_divergence_guard_stops_a_non_finite_loss_naming_the_outer_lr(fake_omniglot):
    from datamodules import Omniglot

    data = Omniglot(str(fake_omniglot), rotations=False, ways=2, queries=3, train_episodes=20, val_episodes=2)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[DivergenceGuard()])  # fmt: skip
    model = NaNAfter(step=3)
    with pytest.raises(
        DivergenceError, match=r"train/loss is nan at step 4 .*The outer learning rate lr=0.001 of NaNAfter is likely"
    ):
        trainer.fit(model, datamodule=data)


def test_divergence_guard_rule_and_arguments():
    with pytest.raises(ValueError, match="factor=0.5 must be > 1"):
        DivergenceGuard(factor=0.5)
    guard = DivergenceGuard(factor=10)
    guard.load_state_dict({"reference": {"val/loss": 2.0}})
    assert guard.state_dict() == {"reference": {"val/loss": 2.0}}
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    model = ProtoNet(Conv4(hidden=8))
    guard._check(trainer, model, "val/loss", "val/loss", 19.0)  # within 10 x 2.0
    with pytest.raises(DivergenceError, match="val/loss is 21 .* over 10 x its reference 2"):
        guard._check(trainer, model, "val/loss", "val/loss", 21.0)
    assert torch.isfinite(torch.tensor(guard.reference["val/loss"]))


@pytest.mark.parametrize(
    "args, first_line",
    [
        (["--model.inner_lr", "abc"], "lightning-meta: error: --model.inner_lr=abc: Expected a <class 'float'>"),
        (["--data.wayz", "5"], "lightning-meta: error: --data.wayz=5: is not an option of this class"),
    ],
)
def test_parse_errors_start_with_the_key_and_value(args, first_line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "maml" / "omniglot_5w1s.yaml"), *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[0].startswith(first_line)


def first_error_line(args: list[str], capsys) -> str:
    """The first line ``lightning-meta`` writes to stderr for ``args`` (a usage error, status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.splitlines()[0]


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "model:\n\tclass_path: ProtoNet\n",
            r"--config {}, line 2: a tab in the indentation; YAML indents with spaces",
        ),
        ("", r"--config {} is empty; give it the settings of a run \(model:, data:, trainer:"),
        ("# only a comment\n", r"--config {} is empty"),
        ("model:\n  init_args: [1,\n", r"--config {}, line 3: not valid YAML \(.*\); fix the file"),
        ("- model\n", r"--config {} holds a list, not settings"),
    ],
)
def test_a_broken_config_names_the_file_and_line(text, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIGHTNING_META_DEBUG", raising=False)
    Path("run.yaml").write_text(text)
    line = first_error_line(["fit", "--config", "run.yaml", "--trainer.fast_dev_run", "1"], capsys)
    assert re.match("lightning-meta: error: " + expected.format(re.escape("run.yaml")), line), line


@pytest.mark.parametrize(
    "args, start, near",
    [
        (["--model", "NoSuchNet", "--data", "Omniglot"], "--model=NoSuchNet: unknown class", None),
        (["--model", "Protonet", "--data", "Omniglot"], "--model=Protonet: unknown class", "lightning_meta.ProtoNet"),
        (["--model", "ProtoNet", "--data", "datamodules.rl.Navigation3D"], "--data=datamodules.rl.Navigation3D: "
         "unknown class", "datamodules.rl.Navigation2D"),
        (["--model", "MAML", "--model.backbone", "lightning_meta.Conv5", "--data", "Sinusoid"],
         "--model.backbone=lightning_meta.Conv5: unknown class", "lightning_meta.backbones.Conv4"),
    ],
)  # fmt: skip
def test_an_unknown_class_is_named_on_the_first_line_with_near_names(args, start, near, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = first_error_line(["fit", *args, "--trainer.fast_dev_run", "1"], capsys)
    assert line.startswith(f"lightning-meta: error: {start}"), line
    assert (f"did you mean {near}?" in line) if near else ("did you mean" not in line and "ProtoNet" in line)
    assert "give the full import path of your own class" in line


@pytest.mark.parametrize("precision", ["64", "64-true", "bf16-true", "16-true"])
def test_a_precision_with_other_than_float32_weights_is_refused_at_start(precision, fake_omniglot, tmp_path,
                                                                          monkeypatch, capsys):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIGHTNING_META_DEBUG", raising=False)
    args = ["fit", "--config", str(PROTONET), *small_omniglot(fake_omniglot), "--trainer.fast_dev_run", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--trainer.precision", precision])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-meta: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"lightning-meta: error: --trainer.precision={precision}: ")
    assert "32-true, bf16-mixed, 16-mixed" in errors[0]
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before training


def test_predict_output_naming_a_folder_says_to_name_a_file(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIGHTNING_META_DEBUG", raising=False)
    for folder in ("support/a", "support/b", "query"):
        Path(folder).mkdir(parents=True)
        Image.new("L", (28, 28)).save(Path(folder) / "1.png")
    Path("out").mkdir()
    line = first_error_line(["predict", "--ckpt_path", "model.ckpt", "--support", "support", "--query", "query",
                             "--output", "out"], capsys)  # fmt: skip
    assert line == "lightning-meta: error: output=out is a folder; pass the CSV file to write, e.g. --output " + str(
        Path("out") / "predictions.csv"
    )


def test_predict_with_a_config_says_what_to_use_and_help_no_longer_offers_it(fake_omniglot, tmp_path, monkeypatch,
                                                                             capsys):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIGHTNING_META_DEBUG", raising=False)
    line = first_error_line(["predict", "--config", str(PROTONET), *small_omniglot(fake_omniglot)], capsys)
    assert line.startswith("lightning-meta: error: `lightning-meta predict` classifies folders of your images: ")
    assert "it takes no --config" in line and "lightning-meta test --config <config> --ckpt_path X" in line
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "with --config it is Lightning's predict" not in " ".join(capsys.readouterr().out.split())


def test_reduce_lr_on_plateau_gets_its_monitor_and_its_short_name_points_to_the_full_one(
    fake_omniglot, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(PROTONET), *small_omniglot(fake_omniglot), "--trainer.fast_dev_run", "1"]
    line = first_error_line([*args, "--model.lr_scheduler", "ReduceLROnPlateau"], capsys)
    assert line.startswith("lightning-meta: error: --model.lr_scheduler=ReduceLROnPlateau: unknown class")
    assert "did you mean torch.optim.lr_scheduler.ReduceLROnPlateau?" in line and "Conv4" not in line
    # It used to stop with "The lr scheduler dict must include a monitor".
    cli = make_cli([*args, "--model.lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"])
    assert cli.trainer.state.finished and cli.trainer.lr_scheduler_configs[0].monitor == "val/loss"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.backbone", "lightning_meta.MLP"], "--model.backbone MLP takes vectors of in_features=1 values, "
         "but Omniglot gives 28x28 images; use an image backbone such as lightning_meta.Conv4"),
        # The backbone takes its image_size from the data (issue 24); one stated otherwise stops at start.
        (["--data.image_size", "40", "--model.init_args.backbone.init_args.image_size", "32"],
         "--model.init_args.backbone.init_args.image_size=32 but --data.image_size=40: the model takes its "
         "image_size from the data, so state it once"),
    ],
)  # fmt: skip
def test_a_backbone_that_cannot_take_the_data_is_named_at_setup(args, message, fake_omniglot, tmp_path, monkeypatch,
                                                                 capsys):  # fmt: skip
    # Both used to fail inside a matrix product ("mat1 and mat2 shapes cannot be multiplied").
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIGHTNING_META_DEBUG", raising=False)
    config = REPO / "configs" / "maml" / "omniglot_5w1s.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *small_omniglot(fake_omniglot), "--trainer.fast_dev_run", "1",
              "--model.init_args.backbone.init_args.out_features", "2", *args])  # fmt: skip
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-meta: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"lightning-meta: error: {message}")


def test_an_error_during_the_sanity_check_starts_on_a_line_of_its_own(fake_omniglot, tmp_path):
    # The progress bar's line was left open and the error printed at its end.
    args = [*small_omniglot(fake_omniglot), "--trainer.enable_progress_bar", "true"]
    # A validation step that raises one of our errors (the old trigger, a channel mismatch, is now caught
    # before the sanity check by the CLI's data-to-model links).
    fail = (
        "import lightning_meta as m, sys; from lightning_meta.backbones.inputs import check_image_size; "
        "m.EpisodicModule.validation_step = lambda *a: check_image_size('Conv4', 1, 2, 'the test'); "
        "from lightning_meta.cli import main; main(sys.argv[1:])"
    )
    command = [sys.executable, "-c", fail, "fit", "--config", str(PROTONET), *args]
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_META_DEBUG"}
    done = subprocess.run(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=180, env=env)  # fmt: skip
    assert done.returncode == 2 and "Sanity Checking" in done.stdout, done.stdout[-3000:]
    lines = done.stdout.splitlines()
    errors = [line for line in lines if "lightning-meta: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("lightning-meta: error: image_size=1 is too small"), errors


@pytest.mark.parametrize(
    "argument, value, message",
    [
        ("solver_iters", "0", "MetaOptNet: solver_iters=0 must be a whole number of 1 or more"),
        ("head", "logistic", "Expected a typing.Literal['svm', 'ridge']. Got value: logistic"),
    ],
)
def test_a_bad_method_argument_names_it_and_what_is_allowed(tmp_path, monkeypatch, capsys, argument, value, message):
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "metaoptnet" / "omniglot_5w1s.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--data.root", str(tmp_path), f"--model.init_args.{argument}", value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
