"""TensorBoard diagnostics, read back with TensorBoard's reader: scalars, hparams, episode images, adaptation curves."""

from __future__ import annotations

import io
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch import nn
from torch.utils.data import DataLoader

from datamodules import EpisodeBatch, Sinusoid
from lightning_meta import MAML, MLP, Reptile
from lightning_meta.callbacks import default_callbacks, episode_grid
from lightning_meta.cli import make_cli
from lightning_meta.functional import adaptation_curve_steps

REPO = Path(__file__).resolve().parents[1]
# 5-way 1-shot 15-query episodes of 28px images, padding 2: a row per class of 1 + gap + 15 cells.
GRID_HEIGHT, GRID_WIDTH = 5 * 30 + 2, (1 + 1 + 15) * 30 + 2


def read_events(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run))
    events.Reload()
    return events


def scalars(events: EventAccumulator) -> dict[str, list[float]]:
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def hparams_plugin(events: EventAccumulator) -> dict[str, HParamsPluginData]:
    found = {}
    for tag, content in events.PluginTagToContent("hparams").items():
        data = HParamsPluginData()
        data.ParseFromString(content)
        found[tag] = data
    return found


def run_cli(config: Path, omniglot_cache: dict, tmp_path: Path, *extra: str) -> list[Path]:
    """Fit 2 short epochs, then test the best checkpoint; return the fit and test run folders."""
    common = ["--config", str(config), "--data.root", omniglot_cache["root"]]
    common += ["--data.cache_dir", omniglot_cache["cache_dir"], "--data.tasks_per_batch", "2"]
    common += ["--data.val_episodes", "4", "--data.test_episodes", "4", "--trainer.enable_progress_bar", "false"]
    common += ["--trainer.precision", "32", *extra]
    fit = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1"]
    make_cli(["fit", *common, *fit])
    make_cli(["test", *common, "--ckpt_path", "best"])
    name = yaml.safe_load(config.read_text())["trainer"]["logger"]["init_args"]["name"]
    return [tmp_path / "lightning_logs" / name / f"version_{v}" for v in (0, 1)]


def check_common_logs(fit_run: Path, test_run: Path, hparam: str) -> tuple[dict, dict]:
    fit_events, test_events = read_events(fit_run), read_events(test_run)
    fit_tags, test_tags = scalars(fit_events), scalars(test_events)
    assert {"train/loss", "train/acc", "val/acc", "val/loss", "hp_metric"} <= set(fit_tags)
    assert {"test/acc", "test/acc_ci95", "test/loss", "hp_metric"} <= set(test_tags)
    assert len(fit_tags["val/acc"]) == 2 and "episodes/s" not in fit_tags  # the progress bar's only
    # The HPARAMS tab: the run's hyperparameters, with hp_metric the best val/acc, then test/acc.
    assert fit_tags["hp_metric"][0] == -1  # the placeholder the logger writes with the hyperparameters
    assert fit_tags["hp_metric"][-1] == pytest.approx(max(fit_tags["val/acc"]), abs=1e-6)
    assert test_tags["hp_metric"][-1] == pytest.approx(test_tags["test/acc"][-1], abs=1e-6)
    for events in (fit_events, test_events):
        plugin = hparams_plugin(events)
        assert hparam in plugin["_hparams_/session_start_info"].session_start_info.hparams
        assert [m.name.tag for m in plugin["_hparams_/experiment"].experiment.metric_infos] == ["hp_metric"]
    # One episode grid per validation epoch and one for test, of the expected size.
    for events, stage, count in ((fit_events, "val", 2), (test_events, "test", 1)):
        images = events.Images(f"{stage}/episode")
        assert len(images) == count
        assert (images[0].height, images[0].width) == (GRID_HEIGHT, GRID_WIDTH)
        pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(images[0].encoded_image_string)).convert("L")))
        pixels = pixels.float()
        assert abs(pixels[2:30, 32:60].mean() - 127.5) <= 1  # the blank gray column between support and queries
        assert pixels[2:30, 2:30].std() > 20  # a character, not a blank cell
    return fit_tags, test_tags


def check_curve(tags: dict[str, list[float]], stage: str, steps: list[int]) -> None:
    width = len(str(steps[-1]))
    names = [f"{stage}_adapt/loss_step_{s:0{width}d}" for s in steps]
    assert sorted(t for t in tags if t.startswith(f"{stage}_adapt/")) == names
    # The point after the last step is the stage's loss, averaged over the same episodes.
    assert tags[names[-1]] == pytest.approx(tags[f"{stage}/loss"], rel=1e-5)
    assert all(len(tags[n]) == len(tags[f"{stage}/loss"]) for n in names)


def test_maml_cli_logs_scalars_hparams_images_and_adaptation_curve(omniglot_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "maml" / "omniglot_5w1s.yaml"
    fit_run, test_run = run_cli(config, omniglot_cache, tmp_path, "--model.task_batching", "loop")
    fit_tags, test_tags = check_common_logs(fit_run, test_run, "inner_lr")
    check_curve(fit_tags, "val", [0, 1, 2, 3])
    check_curve(test_tags, "test", [0, 1, 2, 3])


def test_reptile_cli_logs_its_adaptation_curve_at_powers_of_two(omniglot_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "reptile" / "omniglot_5w1s.yaml"
    fit_run, test_run = run_cli(
        config, omniglot_cache, tmp_path, "--model.inner_steps_eval", "12", "--trainer.num_sanity_val_steps", "0"
    )
    fit_tags, test_tags = check_common_logs(fit_run, test_run, "inner_steps_eval")
    check_curve(fit_tags, "val", [0, 1, 2, 4, 8, 12])
    check_curve(test_tags, "test", [0, 1, 2, 4, 8, 12])


def test_protonet_cli_logs_scalars_hparams_and_images_but_no_curve(omniglot_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "protonet" / "omniglot_5w1s.yaml"
    fit_run, test_run = run_cli(config, omniglot_cache, tmp_path, "--data.train_ways", "5")
    fit_tags, test_tags = check_common_logs(fit_run, test_run, "distance")
    assert not any("_adapt/" in tag for tag in [*fit_tags, *test_tags])


def line_episodes(tasks: int = 4, seed: int = 0) -> EpisodeBatch:
    """Easy regression episodes: y = a x + b with one (a, b) per task, support and queries on the same line."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(tasks, 1, 1, generator=g), torch.randn(tasks, 1, 1, generator=g)
    support_x, query_x = torch.rand(tasks, 10, 1, generator=g) * 2 - 1, torch.rand(tasks, 20, 1, generator=g) * 2 - 1
    return EpisodeBatch(support_x, a * support_x + b, query_x, a * query_x + b)


def validate(model: pl.LightningModule, batch: EpisodeBatch, tmp_path: Path, diagnostics: bool = True) -> dict:
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, inference_mode=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=default_callbacks() if diagnostics else [])  # fmt: skip
    trainer.validate(model, DataLoader([batch], batch_size=None), verbose=False)
    return {k: v.item() for k, v in trainer.callback_metrics.items()}


def make_model(algorithm: str, batching: str, curve: bool = True) -> pl.LightningModule:
    torch.manual_seed(0)
    if algorithm == "maml":
        return MAML(nn.Linear(1, 1), inner_lr=0.3, inner_steps_eval=12, task_batching=batching,  # type: ignore[arg-type]
                    adaptation_curve=curve)  # fmt: skip
    return Reptile(nn.Linear(1, 1), inner_lr=0.3, inner_steps_eval=12, inner_optimizer="sgd",
                   task_batching=batching, adaptation_curve=curve)  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_adaptation_curve_goes_down_on_easy_episodes(algorithm, batching, tmp_path):
    batch = line_episodes()
    metrics = validate(make_model(algorithm, batching), batch, tmp_path)
    steps = adaptation_curve_steps(12)
    curve = [metrics[f"val_adapt/loss_step_{s:02d}"] for s in steps]
    assert steps == [0, 1, 2, 4, 8, 12]
    assert all(later < earlier for earlier, later in zip(curve, curve[1:], strict=False)), curve
    assert curve[-1] < 0.2 * curve[0], curve  # gradient descent on a line fits it
    assert curve[-1] == pytest.approx(metrics["val/loss"], rel=1e-6)
    # Switching the curve off removes the tags and changes no number.
    off = validate(make_model(algorithm, batching, curve=False), batch, tmp_path)
    assert not any("_adapt/" in k for k in off) and off["val/loss"] == metrics["val/loss"]


def test_a_trainer_without_the_callbacks_logs_no_diagnostics(tmp_path):
    batch = line_episodes()
    with_them, without = (validate(make_model("maml", "loop"), batch, tmp_path, d) for d in (True, False))
    assert any("_adapt/" in k for k in with_them)
    assert not any("_adapt/" in k or k in ("hp_metric", "episodes/s") for k in without), without
    assert without["val/loss"] == with_them["val/loss"]


def test_a_python_fit_without_the_callbacks_writes_none_of_their_tags(tmp_path):
    pl.seed_everything(0)
    dm = Sinusoid(tasks_per_batch=4, train_episodes=8, val_episodes=4)
    model = MAML(MLP(), inner_lr=0.01, inner_steps_eval=2, task_batching="loop")
    logger = TensorBoardLogger(tmp_path, name="bare", default_hp_metric=False)
    trainer = pl.Trainer(max_epochs=1, logger=logger, enable_checkpointing=False, inference_mode=False,
                         log_every_n_steps=1, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, dm)
    events = read_events(Path(logger.log_dir))
    tags = scalars(events)
    assert {"train/loss", "val/loss"} <= set(tags)
    assert not any("_adapt/" in t or t in ("hp_metric", "episodes/s") for t in tags), tags
    assert events.Tags()["images"] == []


def test_loop_and_vmap_give_the_same_curve(tmp_path):
    batch = line_episodes()
    for algorithm in ("maml", "reptile"):
        loop, vmapped = (validate(make_model(algorithm, b), batch, tmp_path) for b in ("loop", "vmap"))
        for key in loop:
            assert loop[key] == pytest.approx(vmapped[key], rel=1e-5), (algorithm, key)


class ThroughputProbe(pl.Callback):
    """Reads the progress bar's ``episodes/s`` and the wall clock after every training step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float | None, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rate = trainer.progress_bar_metrics.get("episodes/s")
        self.seen.append((trainer.current_epoch, None if rate is None else float(rate), time.perf_counter()))


def test_episodes_per_second_in_the_progress_bar_and_regression_hp_metric(tmp_path):
    pl.seed_everything(0)
    dm = Sinusoid(tasks_per_batch=4, train_episodes=40, val_episodes=8)
    model = MAML(MLP(), inner_lr=0.01, inner_steps_eval=2, task_batching="loop")
    probe = ThroughputProbe()
    logger = TensorBoardLogger(tmp_path, name="sine")
    trainer = pl.Trainer(max_epochs=2, logger=logger, enable_checkpointing=False, inference_mode=False,
                         log_every_n_steps=1, callbacks=[*default_callbacks(), probe],
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, dm)
    assert len(probe.seen) == 20
    assert probe.seen[0][1] is None  # the first step has no previous one to time
    assert all(rate is not None and rate > 0 for _, rate, _ in probe.seen[1:])
    # 4 episodes per step: the smoothed rate is near 4 / (the wall time between steps).
    first_epoch = [t for epoch, _, t in probe.seen if epoch == 0]
    measured = 4 * (len(first_epoch) - 1) / (first_epoch[-1] - first_epoch[0])
    assert measured / 2 < probe.seen[9][1] < measured * 2, (measured, probe.seen[9][1])
    events = read_events(Path(logger.log_dir))
    tags = scalars(events)
    assert "episodes/s" not in tags
    # Regression data: hp_metric is the lowest val/loss, and the sinusoid gets no image grid.
    assert tags["hp_metric"][-1] == pytest.approx(min(tags["val/loss"]), rel=1e-6)
    assert events.Tags()["images"] == []
    assert {"val_adapt/loss_step_0", "val_adapt/loss_step_1", "val_adapt/loss_step_2"} <= set(tags)


def test_episode_grid_layout_for_rgb_and_normalised_images():
    g = torch.Generator().manual_seed(0)
    ways, shots, queries, size = 3, 2, 4, 8
    support_x = torch.randn(1, ways * shots, 3, size, size, generator=g) * 3  # normalised: outside [0, 1]
    query_x = torch.randn(1, ways * queries, 3, size, size, generator=g) * 3
    labels = (torch.arange(ways).repeat_interleave(k).unsqueeze(0) for k in (shots, queries))
    batch = EpisodeBatch(support_x, next(labels), query_x, next(labels))
    grid = episode_grid(batch)
    assert grid is not None and grid.shape == (3, ways * (size + 2) + 2, (shots + 1 + queries) * (size + 2) + 2)
    assert grid.min() >= 0 and grid.max() <= 1
    # Row 1, column 0 is the first support image of class 1, rescaled by the episode's range.
    low, high = min(support_x.min(), query_x.min()), max(support_x.max(), query_x.max())
    cell = grid[:, 12 : 12 + size, 2 : 2 + size]
    torch.testing.assert_close(cell, (support_x[0, shots] - low) / (high - low))
    sine = Sinusoid(tasks_per_batch=1)
    sine.setup("fit")
    assert episode_grid(next(iter(sine.train_dataloader()))) is None
