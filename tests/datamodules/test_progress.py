"""Long silent work before the first step shows progress: the image cache build says where it went and how large."""

import logging

import datamodules.images as images
from datamodules import Omniglot


def test_cache_build_shows_progress_and_names_the_cache_once(fake_omniglot, tmp_path, monkeypatch, caplog):
    bars = []

    def recording_tqdm(items, **kwargs):
        bars.append(kwargs)
        return items

    monkeypatch.setattr(images, "tqdm", recording_tqdm)
    cache = tmp_path / "cache"
    dm = Omniglot(root=str(fake_omniglot), cache_dir=str(cache), rotations=False, ways=2)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
    assert [bar["desc"] for bar in bars] == ["decoding images_background.zip", "decoding images_evaluation.zip"]
    assert all(bar["delay"] > 0 for bar in bars)  # a build of a few seconds prints no bar
    said = [r.getMessage() for r in caplog.records if "image cache built" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert str(cache) in said[0] and "omniglot_train_28px.pt" in said[0] and " MB)" in said[0]

    caplog.clear()
    with caplog.at_level(logging.INFO):
        Omniglot(root=str(fake_omniglot), cache_dir=str(cache), rotations=False, ways=2).prepare_data()
    assert "image cache built" not in caplog.text  # the cache is read, nothing was built


def test_progress_bar_is_drawn_on_stderr(capsys):
    assert list(images.progress(range(3), 3, "decoding x", delay=0)) == [0, 1, 2]
    assert "decoding x" in capsys.readouterr().err
