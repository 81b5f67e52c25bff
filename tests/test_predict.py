"""Predicting with a trained checkpoint: load_checkpoint, predict_episode, and `lightning-meta predict` on folders."""

import csv
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_meta import MAML, MLP, Conv4, MatchingNet, ProtoNet, Reptile, load_checkpoint, predict_episode
from lightning_meta.cli import main, make_cli
from lightning_meta.inference import predict_folders

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "lightning-meta"
PROTONET = REPO / "configs" / "protonet" / "omniglot_5w1s.yaml"


@pytest.fixture(scope="module")
def trained(omniglot_cache, tmp_path_factory):
    """A ProtoNet trained briefly on real Omniglot through the CLI (300 episodes of 20 ways)."""
    root = tmp_path_factory.mktemp("protonet_fit")
    args = ["fit", "--config", str(PROTONET), "--data.root", omniglot_cache["root"]]
    args += ["--data.cache_dir", omniglot_cache["cache_dir"], "--data.train_ways", "20", "--data.train_episodes", "300"]
    args += ["--data.val_episodes", "10", "--trainer.max_epochs", "1", "--trainer.precision", "32"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(root)]
    cli = make_cli(args)
    run = Path(cli.trainer.log_dir)
    return {"cli": cli, "ckpt": run / "checkpoints" / "last.ckpt", "root": root}


def unpack_characters(zip_path: Path, out: Path, characters: int = 5, queries: int = 6) -> list[str]:
    """PNGs of the first ``characters`` test-split characters: ``support/<char>/<1 png>`` and ``query/<char>/...``."""
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".png"))
        by_char: dict[str, list[str]] = {}
        for name in names:
            _, alphabet, char, _ = name.split("/")
            by_char.setdefault(f"{alphabet}_{char}", []).append(name)
        # Every 40th character: spread over the alphabets (the evaluation zip holds only val/test characters).
        chosen = sorted(by_char)[::40][:characters]
        for char in chosen:
            for i, member in enumerate(by_char[char][: 1 + queries]):
                folder = out / ("support" if i == 0 else "query") / char
                folder.mkdir(parents=True, exist_ok=True)
                (folder / Path(member).name).write_bytes(archive.read(member))
    return chosen


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_predict_folders_on_real_omniglot_pngs(trained, omniglot_root, tmp_path):
    chars = unpack_characters(omniglot_root / "images_evaluation.zip", tmp_path, queries=10)
    out = tmp_path / "out.csv"
    command = [str(SCRIPT), "predict", "--ckpt_path", str(trained["ckpt"]), "--support", str(tmp_path / "support")]
    command += ["--query", str(tmp_path / "query"), "--output", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_csv(out)
    assert len(rows) == 5 * 10 and {r["true_class"] for r in rows} == set(chars)
    assert set(rows[0]) == {"query", "predicted_class", "probability", "true_class", *(f"prob_{c}" for c in chars)}
    for row in rows:
        assert row["query"] == f"{row['true_class']}/{Path(row['query']).name}"
        assert float(row["probability"]) == max(float(row[f"prob_{c}"]) for c in chars)
        assert sum(float(row[f"prob_{c}"]) for c in chars) == pytest.approx(1, abs=1e-4)
    accuracy = sum(r["predicted_class"] == r["true_class"] for r in rows) / len(rows)
    assert f"accuracy {accuracy:.3f}" in done.stdout
    print(f"predict accuracy on 5-way 1-shot real Omniglot PNGs: {accuracy:.3f}")
    # Measured 1.0 after this fit (chance is 0.2); read without Omniglot's inversion, 0.7 (below).
    assert accuracy >= 0.85

    wrong = predict_folders(str(trained["ckpt"]), str(tmp_path / "support"), str(tmp_path / "query"),
                            str(tmp_path / "inverted.csv"), invert=False)  # fmt: skip
    print(f"without the inversion: {wrong.accuracy:.3f}")
    assert wrong.accuracy <= accuracy - 0.15


def test_predict_flat_query_folder_in_python(trained, omniglot_root, tmp_path):
    unpack_characters(omniglot_root / "images_evaluation.zip", tmp_path, characters=3, queries=2)
    flat = tmp_path / "flat"
    flat.mkdir()
    for png in (tmp_path / "query").rglob("*.png"):
        png.rename(flat / png.name)
    (flat / "notes.txt").write_text("not an image")
    result = predict_folders(str(trained["ckpt"]), str(tmp_path / "support"), str(flat), str(tmp_path / "p.csv"))
    assert result.accuracy is None and len(result.queries) == 6 and all(t is None for t in result.true)
    assert result.preprocessing.invert and result.preprocessing.image_size == 28 and result.preprocessing.channels == 1
    rows = read_csv(tmp_path / "p.csv")
    assert [r["query"] for r in rows] == sorted(p.name for p in flat.glob("*.png"))
    assert all(r["true_class"] == "" for r in rows)


def test_load_checkpoint_round_trip_equals_the_trained_model(trained):
    model = load_checkpoint(trained["ckpt"])
    fitted = trained["cli"].model.eval()
    assert type(model) is ProtoNet and not model.training
    assert isinstance(model.backbone, Conv4) and model.backbone.features[0].in_channels == 1
    torch.manual_seed(0)
    support_x, query_x = torch.rand(10, 1, 28, 28), torch.rand(7, 1, 28, 28)
    support_y = torch.arange(5).repeat_interleave(2)
    expected = predict_episode(fitted, support_x, support_y, query_x)
    torch.testing.assert_close(predict_episode(model, support_x, support_y, query_x), expected)
    assert expected.shape == (7, 5)
    # The optimizer callable came back from the saved class_path/init_args.
    assert model.optimizer_factory(model.parameters()).param_groups[0]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ProtoNet(Conv4(hidden=8)),
        lambda: MatchingNet(Conv4(hidden=8)),
        lambda: MAML(
            Conv4(hidden=8, out_features=3, track_running_stats=False),
            inner_lr=0.1,
            inner_steps_eval=2,
            task_batching="loop",
        ),  # fmt: skip
        lambda: Reptile(
            Conv4(hidden=8, out_features=3, track_running_stats=False), inner_steps_eval=3, inner_batch_size=3
        ),  # fmt: skip
    ],
    ids=["protonet", "matchingnet", "maml", "reptile"],
)
def test_predict_episode_returns_probabilities(make):
    torch.manual_seed(0)
    model = make()
    support_x, query_x = torch.rand(6, 1, 28, 28), torch.rand(4, 1, 28, 28)
    support_y = torch.tensor([0, 0, 1, 1, 2, 2])
    probabilities = predict_episode(model, support_x, support_y, query_x)
    assert probabilities.shape == (4, 3) and not probabilities.requires_grad
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(4))
    if model.needs_grad_in_eval:  # it adapted: the prediction differs from the unadapted network's
        with torch.no_grad():
            unadapted = model.backbone(query_x).softmax(-1)
        assert not torch.allclose(probabilities, unadapted, atol=1e-4)
        with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference_mode"):
            predict_episode(model, support_x, support_y, query_x)


def test_predict_episode_regression_and_bad_labels():
    torch.manual_seed(0)
    model = MAML(MLP(1, (8,), 1), inner_lr=0.01, task_batching="loop")
    x = torch.rand(5, 1)
    predictions = predict_episode(model, x, torch.sin(x), torch.rand(3, 1))
    assert predictions.shape == (3, 1)
    with pytest.raises(ValueError, match="every label 0..N-1"):
        predict_episode(ProtoNet(Conv4(hidden=8)), torch.rand(2, 1, 28, 28), torch.tensor([0, 2]),
                        torch.rand(1, 1, 28, 28))  # fmt: skip


def png(path: Path, mode: str = "L", size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), 255 if mode == "L" else (255, 255, 255)).save(path)


@pytest.fixture
def folders(tmp_path):
    for char in ("a", "b"):
        png(tmp_path / "support" / char / "1.png")
        png(tmp_path / "query" / char / "2.png")
    return tmp_path


def test_missing_checkpoint_is_a_clear_error(folders):
    with pytest.raises(FileNotFoundError, match="checkpoint '.*nope.ckpt' does not exist"):
        load_checkpoint(folders / "nope.ckpt")


def test_bad_folders_are_clear_errors(trained, folders):
    ckpt = str(trained["ckpt"])
    with pytest.raises(FileNotFoundError, match="support=.*missing is not a folder"):
        predict_folders(ckpt, str(folders / "missing"), str(folders / "query"))
    (folders / "support" / "empty").mkdir()
    (folders / "support" / "empty" / "README").write_text("no images here")
    with pytest.raises(ValueError, match="support class 'empty' .* has no image; add at least one image"):
        predict_folders(ckpt, str(folders / "support"), str(folders / "query"))
    (folders / "support" / "empty" / "README").unlink()
    (folders / "support" / "empty").rmdir()
    (folders / "noquery").mkdir()
    with pytest.raises(ValueError, match="query=.*noquery has no image"):
        predict_folders(ckpt, str(folders / "support"), str(folders / "noquery"))
    with pytest.raises(ValueError, match=r"channels=3 \(from --channels\) but the backbone .* takes 1-channel"):
        predict_folders(ckpt, str(folders / "support"), str(folders / "query"), channels=3)


def test_a_regression_checkpoint_is_refused(tmp_path, monkeypatch, folders):
    monkeypatch.chdir(tmp_path)
    cli = make_cli(["fit", "--config", str(REPO / "configs" / "maml" / "sinusoid.yaml"), "--trainer.max_steps", "1",
                    "--data.tasks_per_batch", "2", "--data.val_episodes", "2", "--model.task_batching", "loop",
                    "--trainer.enable_progress_bar", "false"])  # fmt: skip
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="regression model .* predict is for image classification checkpoints"):
        predict_folders(str(ckpt), str(folders / "support"), str(folders / "query"))


def test_cli_predict_errors_are_one_line(folders, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(folders / "nope.ckpt"), "--support", str(folders / "support"),
              "--query", str(folders / "query")])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-meta: error: checkpoint ") and "Traceback" not in err


def test_predict_help_and_top_level_help():
    out = subprocess.run([str(SCRIPT), "predict", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--support" in out and "--query" in out and "--invert" in out
    out = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    assert "lightning-meta predict --ckpt_path" in " ".join(out.split())


def test_the_summary_counts_the_queries_it_scores_and_names_the_folders_it_does_not(fake_omniglot, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    # A query folder named like no support class ("c") was predicted but left out of the accuracy unsaid.
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        str(PROTONET),
        "--data.root",
        str(fake_omniglot),
        "--data.rotations",
        "false",
        "--data.ways",
        "2",
        "--data.train_ways",
        "2",
        "--data.queries",
        "3",
        "--trainer.max_steps",
        "1",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.precision",
        "32",
    ]
    ckpt = Path(make_cli(args).trainer.log_dir) / "checkpoints" / "last.ckpt"  # fmt: skip
    for name in ("support/a/1.png", "support/b/1.png", "query/a/2.png", "query/c/3.png", "query/c/4.png",
                 "query/5.png"):  # fmt: skip
        png(tmp_path / name)
    result = predict_folders(str(ckpt), "support", "query", output="out.csv")
    assert len(result.queries) == 4 and result.scored == 1 and result.unscored == {"c": 2}
    summary = result.summary()
    assert "wrote 4 predictions over 2 classes to out.csv; accuracy " in summary
    assert summary.endswith("on the 1 queries in class folders; 2 queries in folders named like no support class "
                            "are not scored: c (2)")  # fmt: skip


@pytest.mark.parametrize("part", ["support_x", "query_x"])
def test_non_finite_inputs_are_refused_instead_of_predicting_nan(part):
    x = {"support_x": torch.rand(2, 1, 28, 28), "query_x": torch.rand(3, 1, 28, 28)}
    x[part][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{part} holds 1 NaN or infinite value"):
        predict_episode(ProtoNet(Conv4(hidden=8)), x["support_x"], torch.tensor([0, 1]), x["query_x"])
