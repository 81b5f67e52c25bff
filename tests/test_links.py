"""Shapes flow forward: the data states ways, image size and channels once, and the CLI sizes the model from them."""

import errno
import io
import os
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.files import WriteError
from lightning_meta.cli import AtomicSaveConfigCallback, make_cli
from lightning_meta.inference import predict_folders
from lightning_meta.links import data_shapes

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def build(fake_omniglot: Path, config: str, *args: str):
    """The CLI's model and data for ``config`` on the fake Omniglot, without running anything."""
    argv = ["--config", str(CONFIGS / config), "--data.root", str(fake_omniglot), "--data.rotations", "false"]
    return make_cli([*argv, *args], run=False)


def test_the_data_sizes_heads_and_backbones_at_every_depth(fake_omniglot, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    maml = build(fake_omniglot, "maml/omniglot_5w1s.yaml", "--data.ways", "3", "--data.image_size", "20").model
    assert maml.head_outputs == 3 and maml.backbone.image_size == 20
    protonet = build(fake_omniglot, "protonet/omniglot_5w1s.yaml", "--data.image_size", "20").model
    assert protonet.backbone.image_size == 20 and protonet.backbone.head is None  # stays headless
    members = build(fake_omniglot, "aggregate/omniglot_5w1s.yaml", "--data.ways", "3").model.members
    assert [getattr(m, "head_outputs", None) for m in members] == [None, None, 3]
    rfs = build(fake_omniglot, "rfs/omniglot_5w1s.yaml")
    assert rfs.model.num_classes == rfs.datamodule.num_train_classes


def test_a_model_setting_that_disagrees_with_the_data_stops_at_start(fake_omniglot, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = r"--model.init_args.backbone.init_args.out_features=5 but --data.ways=3: the model takes its out_features"
    with pytest.raises(ValueError, match=message):
        build(fake_omniglot, "maml/omniglot_5w1s.yaml", "--data.ways", "3",
              "--model.init_args.backbone.init_args.out_features", "5")  # fmt: skip
    with pytest.raises(ValueError, match=r"--model.init_args.ways=5 but --data.ways=3"):  # MetaNetwork requires ways
        build(fake_omniglot, "metanetwork/omniglot_5w1s.yaml", "--data.ways", "3")
    with pytest.raises(ValueError, match=r"init_args.image_size=40 but --data.image_size=28"):
        build(fake_omniglot, "protonet/omniglot_5w1s.yaml", "--model.init_args.backbone.init_args.image_size", "40")


def test_regression_data_links_no_ways():
    from jsonargparse import Namespace

    sinusoid = Namespace(class_path="datamodules.Sinusoid", init_args=Namespace(ways=1))
    omniglot = Namespace(class_path="datamodules.Omniglot", init_args=Namespace(ways=5, image_size=28))
    assert "ways" not in data_shapes(sinusoid)
    assert data_shapes(omniglot) == {"ways": 5, "image_size": 28, "channels": 1}


# ----------------------------------------------------------------------------- a fitted run
@pytest.fixture
def fitted(fake_omniglot, tmp_path, monkeypatch):
    """A ProtoNet fitted for one short epoch on the fake Omniglot through the CLI: its run folder and data args."""
    monkeypatch.chdir(tmp_path)
    data = ["--data.root", str(fake_omniglot), "--data.rotations", "false", "--data.ways", "3", "--data.queries", "2"]
    data += ["--data.train_ways", "3"]
    data += ["--data.train_episodes", "2", "--data.val_episodes", "2", "--data.test_episodes", "2"]
    common = ["--config", str(CONFIGS / "protonet" / "omniglot_5w1s.yaml"), *data, "--trainer.precision", "32"]
    common += ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    cli = make_cli(["fit", *common, "--trainer.max_epochs", "1"])
    return {"cli": cli, "run": Path(cli.trainer.log_dir), "args": common, "root": fake_omniglot}


def test_config_yaml_is_written_atomically(fitted, monkeypatch):
    config = fitted["run"] / "config.yaml"
    assert "class_path: datamodules.Omniglot" in config.read_text()
    callback = next(c for c in fitted["cli"].trainer.callbacks if isinstance(c, AtomicSaveConfigCallback))
    config.write_text("the previous config\n")
    callback.already_saved = False

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(WriteError, match="config"):
        callback.setup(fitted["cli"].trainer, fitted["cli"].model, "fit")
    assert config.read_text() == "the previous config\n"
    assert sorted(p.name for p in fitted["run"].iterdir() if "config" in p.name) == ["config.yaml"]


def test_resuming_with_other_episodes_is_refused_unless_allowed(fitted):
    last = str(fitted["run"] / "checkpoints" / "last.ckpt")
    resume = ["fit", *fitted["args"], "--ckpt_path", last, "--trainer.max_epochs", "2"]
    message = rf"--data.shots=2 but {last} was trained with shots=1; .*--allow_episode_changes true"
    with pytest.raises(ValueError, match=message):
        make_cli([*resume, "--data.shots", "2"])
    allowed = make_cli([*resume, "--data.shots", "2", "--allow_episode_changes", "true"])
    assert allowed.trainer.current_epoch == 2


def png_folders(zip_path: Path, out: Path) -> None:
    """``support/<char>/`` (one PNG) and ``query/<char>/`` (two PNGs) for three characters of a fake Omniglot zip."""
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".png"))
    by_char: dict[str, list[str]] = {}
    for name in names:
        by_char.setdefault(str(Path(name).parent), []).append(name)
    with zipfile.ZipFile(zip_path) as archive:
        for i, char in enumerate(sorted(by_char)[:3]):
            for j, member in enumerate(by_char[char][:3]):
                folder = out / ("support" if j == 0 else "query") / f"c{i}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.open(io.BytesIO(archive.read(member))).save(folder / f"{j}.png")


def test_bundles_declare_their_preprocessing_and_old_checkpoints_still_predict(fitted, tmp_path):
    ckpt = fitted["run"] / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    declared = saved["datamodule_hyper_parameters"]["preprocessing"]
    assert declared == {"image_size": 28, "channels": 1, "invert": True, "mean": None, "std": None}
    png_folders(fitted["root"] / "images_evaluation.zip", tmp_path / "pngs")
    support, query = str(tmp_path / "pngs" / "support"), str(tmp_path / "pngs" / "query")
    new = predict_folders(str(ckpt), support, query, str(tmp_path / "new.csv"))

    del saved["datamodule_hyper_parameters"]["preprocessing"]  # as written before bundles declared it
    old_ckpt = tmp_path / "old.ckpt"
    torch.save(saved, old_ckpt)
    old = predict_folders(str(old_ckpt), support, query, str(tmp_path / "old.csv"))
    for result in (new, old):
        p = result.preprocessing
        assert (p.image_size, p.channels, p.invert, p.mean, p.std) == (28, 1, True, None, None)
    torch.testing.assert_close(new.probabilities, old.probabilities)
    assert len(new.queries) == 6


def test_prediction_does_not_rebuild_or_import_bundles():
    source = (REPO / "lightning_meta" / "inference.py").read_text()
    assert "from datamodules.omniglot" not in source and "data_cls(" not in source
