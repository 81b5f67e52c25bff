import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_data import FAKE_DATA
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_meta.cli import main, make_cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def data_args(config: Path, omniglot_cache, small: bool = False, tmp_path: Path | None = None) -> list[str]:
    data = yaml.safe_load(config.read_text())["data"]
    name = data["class_path"].split(".")[-1]
    args = []
    if name == "Omniglot":
        args += ["--data.root", omniglot_cache["root"], "--data.cache_dir", omniglot_cache["cache_dir"]]
    elif name in FAKE_DATA:
        assert tmp_path is not None, f"{name} needs a folder for its fake data"
        folder = tmp_path / "fake_data"
        folder.mkdir(exist_ok=True)
        args += FAKE_DATA[name](folder)
    if small and data["init_args"].get("tasks_per_batch", 1) > 2:
        args += ["--data.tasks_per_batch", "2"]  # wiring, not throughput: keep MAML's meta-batch small
    if small and data["init_args"].get("train_batches") == "labelled" and data["init_args"].get("batch_size", 64) > 8:
        args += ["--data.batch_size", "8"]  # a pre-training batch of 64 through ResNet-12 at 84 px: wiring only
    model = yaml.safe_load(config.read_text())["model"]
    if small and model["class_path"].endswith("MAML") and model["init_args"].get("task_batching", "auto") == "auto":
        args += ["--model.init_args.task_batching", "loop"]  # auto times vmap too: minutes at 84x84 on CPU
    if small and model["class_path"].endswith("Aggregate"):
        args += ["--data.queries", "3"]  # three members (one a 20-way MAML) on every query: wiring needs few
    backbone = model["init_args"].get("backbone", {}).get("class_path", "")
    if small and model["class_path"].endswith(("MAML", "Reptile")) and "ResNet12" in backbone:
        # Second-order steps through a 12M-parameter ResNet take minutes on CPU; this test checks wiring.
        args += ["--model.init_args.inner_steps", "1", "--model.init_args.inner_steps_eval", "1"]
        args += ["--model.init_args.first_order", "true", "--data.tasks_per_batch", "1"]
    if small and model["class_path"].endswith(("MAMLRL", "RL2")):
        # Meta-RL wiring: short episodes and few rollouts (full HalfCheetah rollouts take minutes on CPU).
        args += ["--data.horizon", "20"] if "horizon" in data["init_args"] else []
        args += ["--model.init_args.trajectories", "2"] if model["class_path"].endswith("MAMLRL") else []
        args += ["--model.init_args.trials", "2"] if model["class_path"].endswith("RL2") else []
    if small and model["class_path"].endswith(("R2D2", "MetaOptNet")) and "ResNet12" in backbone:
        # Two 5-way 15-shot episodes through ResNet-12 at 84 px took 150 s on CPU; this test checks wiring.
        args += ["--data.tasks_per_batch", "1", "--data.train_shots", "1", "--data.train_queries", "1"]
    return args


def scalars(log_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_runs_fast_dev_run(config, omniglot_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = make_cli(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.fast_dev_run",
            "1",
            *data_args(config, omniglot_cache, small=True, tmp_path=tmp_path),
        ]
    )
    assert cli.trainer.state.finished
    assert "train/loss" in cli.trainer.callback_metrics


def test_fit_writes_tensorboard_and_test_best_reports_ci(omniglot_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "protonet" / "omniglot_5w1s.yaml"
    common = ["--config", str(config), *data_args(config, omniglot_cache), "--data.train_ways", "5"]
    common += [
        "--data.val_episodes",
        "8",
        "--data.test_episodes",
        "30",
        "--trainer.enable_progress_bar",
        "false",
    ]
    main(
        [
            "fit",
            *common,
            "--trainer.max_epochs",
            "2",
            "--trainer.limit_train_batches",
            "3",
            "--trainer.log_every_n_steps",
            "1",
        ]
    )
    run = tmp_path / "lightning_logs" / "protonet_omniglot_5w1s" / "version_0"
    tags = scalars(run)
    assert {"train/loss", "train/acc", "val/acc", "val/loss"} <= set(tags)
    assert len(tags["val/acc"]) == 2 and all(0 <= v <= 1 for v in tags["val/acc"])
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["distance"] == "euclidean" and hparams["ways"] == 5 and hparams["train_ways"] == 5
    assert len(list((run / "checkpoints").glob("best-*.ckpt"))) == 1

    cli = make_cli(["test", *common, "--ckpt_path", "best"])
    test_run = tmp_path / "lightning_logs" / "protonet_omniglot_5w1s" / "version_1"
    tags = scalars(test_run)
    assert {"test/acc", "test/acc_ci95", "test/loss"} <= set(tags)
    assert 0 < tags["test/acc_ci95"][0] < 0.2
    assert cli.trainer.ckpt_path.endswith(".ckpt") and "best-" in cli.trainer.ckpt_path


def test_test_best_without_a_previous_fit_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["test", "--config", str(REPO / "configs" / "maml" / "sinusoid.yaml"), "--ckpt_path", "best"]
    with pytest.raises(FileNotFoundError, match="run `lightning-meta fit`"):
        make_cli(args)
    with pytest.raises(SystemExit) as exit_info:  # main prints it as one line
        main(args)
    assert exit_info.value.code == 2
    assert "lightning-meta: error: --ckpt_path best: no checkpoint under" in capsys.readouterr().err


def test_wrong_key_names_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "maml" / "sinusoid.yaml"),
                "--model.init_args.inner_lrr",
                "0.1",
            ]
        )
    assert "inner_lrr" in capsys.readouterr().err


def test_short_class_names_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = make_cli(
        ["fit", "--model", "MAML", "--model.backbone", "lightning_meta.MLP", "--data", "Sinusoid",
         # MAML's default inner_lr 0.4 diverges on sinusoids (the guard stops it): the README's 0.01.
         "--data.tasks_per_batch", "2", "--model.inner_lr", "0.01", "--trainer.fast_dev_run", "1"]
    )  # fmt: skip
    assert type(cli.model).__name__ == "MAML" and type(cli.datamodule).__name__ == "Sinusoid"


def test_module_entry_point_and_console_script_help():
    out = subprocess.run([sys.executable, "-m", "lightning_meta", "--help"], capture_output=True, text=True, check=True)
    assert "fit" in out.stdout and "test" in out.stdout
    script = Path(sys.executable).parent / "lightning-meta"
    out = subprocess.run([str(script), "fit", "--help"], capture_output=True, text=True, check=True)
    assert "--data" in out.stdout and "--model" in out.stdout


def test_ddp_with_two_cpu_processes_trains_maml(tmp_path):
    """Real DDP: Lightning relaunches the command for rank 1 (gloo on CPU)."""
    script = Path(sys.executable).parent / "lightning-meta"
    command = [str(script), "fit", "--config", str(REPO / "configs" / "maml" / "sinusoid.yaml")]
    command += ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    command += ["--trainer.max_epochs", "2", "--data.train_episodes", "400", "--data.val_episodes", "50"]
    command += ["--trainer.enable_progress_bar", "false", "--model.task_batching", "loop"]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out.stderr + out.stdout
    tags = scalars(tmp_path / "lightning_logs" / "maml_sinusoid" / "version_0")
    assert len(tags["val/loss"]) == 2 and tags["val/loss"][1] < tags["val/loss"][0]


def test_print_config_prints_the_resolved_yaml(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "maml" / "sinusoid.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lightning_meta.MAML"
    assert printed["data"]["init_args"]["shots"] == 10 and printed["trainer"]["inference_mode"] is False


def test_a_users_own_subclass_by_class_path(fake_omniglot, tmp_path, monkeypatch):
    """A module from the user's project, not registered anywhere, runs from the CLI by its class path."""
    project = tmp_path / "myproject"
    project.mkdir()
    (project / "__init__.py").write_text("")
    (project / "models.py").write_text(
        "from lightning_meta import ProtoNet\n\n\n"
        "class CosineProtoNet(ProtoNet):\n"
        "    def __init__(self, scale: float = 5.0) -> None:\n"
        "        super().__init__(distance='cosine', cosine_scale=scale)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cli = make_cli(
        ["fit", "--model", "myproject.models.CosineProtoNet", "--model.scale", "3", "--data", "Omniglot",
         "--data.root", str(fake_omniglot), "--data.rotations", "false", "--data.ways", "2", "--data.queries", "3",
         "--trainer.fast_dev_run", "1", "--trainer.logger", "false"]
    )  # fmt: skip
    assert type(cli.model).__name__ == "CosineProtoNet" and cli.model.cosine_scale == 3
    assert cli.trainer.state.finished


def test_validate_best_reproduces_the_best_validation_figure(fake_omniglot, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "protonet" / "omniglot_5w1s.yaml"
    common = ["--config", str(config), "--data.root", str(fake_omniglot), "--data.rotations", "false"]
    common += ["--data.ways", "2", "--data.queries", "3", "--data.train_ways", "2", "--data.val_episodes", "6"]
    common += ["--trainer.enable_progress_bar", "false", "--trainer.precision", "32"]
    fit = make_cli(["fit", *common, "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2"])
    best = fit.trainer.checkpoint_callback.best_model_score.item()
    validate = make_cli(["validate", *common, "--ckpt_path", "best"])
    assert validate.trainer.callback_metrics["val/acc"].item() == pytest.approx(best, abs=1e-6)
