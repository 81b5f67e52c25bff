"""Bad input (issue "bad input"): episode settings, damaged archives and downloads without network.

Each error is checked where a user meets it: through the real CLI or the public constructor.
"""

import gzip
import io
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from datamodules import CIFARFS, CUB, Omniglot
from datamodules.download import DownloadError
from lightning_meta.cli import main, make_cli

DATA = Path(__file__).parents[1] / "data"
pytestmark = pytest.mark.filterwarnings("ignore:.*the official file has", "ignore:the '.*' split of .* classes")


# ----------------------------------------------------------------------------- 1. episode settings
@pytest.mark.parametrize(
    "key, value",
    [
        ("ways", "0"),
        ("ways", "-5"),
        ("shots", "0"),
        ("shots", "-1"),
        ("queries", "0"),
        ("tasks_per_batch", "0"),
        ("train_episodes", "0"),
        ("val_episodes", "-2"),
        ("test_episodes", "0"),
        ("train_ways", "0"),
        ("train_shots", "-1"),
        ("train_queries", "0"),
        ("num_workers", "-1"),
        ("image_size", "0"),
    ],
)
def test_cli_names_the_bad_setting_and_its_value(key, value, fake_omniglot, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--model", "ProtoNet", "--data", "Omniglot", "--data.root", str(fake_omniglot)]
    with pytest.raises(SystemExit) as exit_info:
        make_cli([*args, f"--data.{key}", value, "--trainer.fast_dev_run", "1"])
    assert exit_info.value.code == 2  # a usage error while parsing, before anything is built
    err = capsys.readouterr().err
    # The first line names the key, the value and the rule; jsonargparse's nested message follows.
    rule = "0 or more" if key == "num_workers" else "1 or more"
    assert err.splitlines()[0] == f"lightning-meta: error: --data.{key}={value}: must be a whole number of {rule}"
    assert f'Parser key "{key}"' in err and "Traceback" not in err
    assert len(err.splitlines()) < 30  # not the CLI's hundreds of lines of usage


@pytest.mark.parametrize("key", ["ways", "train_ways"])
def test_one_way_episodes_are_refused(key, fake_omniglot, tmp_path, monkeypatch, capsys):
    # A 1-way episode trained with loss 0 and val/acc 1.0.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIGHTNING_META_DEBUG", raising=False)
    args = ["fit", "--model", "ProtoNet", "--data", "Omniglot", "--data.root", str(fake_omniglot)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"--data.{key}", "1", "--trainer.fast_dev_run", "1"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-meta: error:")]
    assert len(errors) == 1 and f"{key}=1: a 1-way episode has a single class" in errors[0]
    assert f"set {key} to 2 or more" in errors[0]
    with pytest.raises(ValueError, match=f"{key}=1: a 1-way episode"):
        Omniglot(str(fake_omniglot), **{key: 1})


def test_yaml_config_with_a_bad_setting_is_a_usage_error(fake_omniglot, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_text(
        "model:\n  class_path: lightning_meta.ProtoNet\n"
        f"data:\n  class_path: datamodules.Omniglot\n  init_args:\n    root: {fake_omniglot}\n    shots: 0\n"
    )
    with pytest.raises(SystemExit):
        make_cli(["fit", "--config", str(config)])
    err = capsys.readouterr().err
    assert 'Parser key "shots"' in err and "0 does not conform to restriction v>0" in err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ways": 0}, r"ways=0 must be at least 1; set ways to a whole number of 1 or more"),
        ({"shots": -1}, r"shots=-1 must be at least 1"),
        ({"queries": 0}, r"queries=0 must be at least 1"),
        ({"tasks_per_batch": 0}, r"tasks_per_batch=0 must be at least 1"),
        ({"train_ways": 0}, r"train_ways=0 must be at least 1; .* or None to use ways"),
        ({"test_episodes": 0}, r"test_episodes=0 must be at least 1"),
        ({"num_workers": -1}, r"num_workers=-1 must be at least 0"),
        ({"image_size": 0}, r"image_size=0 must be at least 1"),
        ({"split": "lakes"}, r"split='lakes' must be one of \['lake', 'vinyals'\]"),
    ],
)
def test_constructor_names_the_bad_setting(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        Omniglot(root=str(tmp_path), **kwargs)


# ----------------------------------------------------------------------------- 2. damaged archives
def corrupt_member(path: Path, member: str) -> None:
    """Flip the first 16 bytes of ``member``'s compressed data; the zip's directory stays valid."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    data = bytearray(path.read_bytes())
    # The local header: 30 bytes, then the name and the extra field, then the data.
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    for i in range(start, start + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_damaged_zip_member_names_the_archive_and_the_member(compression, fake_omniglot):
    path = fake_omniglot / "images_evaluation.zip"
    with zipfile.ZipFile(path) as src:
        entries = {n: src.read(n) for n in src.namelist()}
    with zipfile.ZipFile(path, "w", compression) as dst:  # the official zips are deflated, the fake ones stored
        for name, data in entries.items():
            dst.writestr(name, data)
    member = sorted(entries)[7]
    corrupt_member(path, member)
    with pytest.raises(ValueError) as err:
        Omniglot(root=str(fake_omniglot)).prepare_data()
    message = str(err.value)
    assert f"{path} is damaged: its member '{member}' cannot be read" in message
    assert ("Bad CRC-32" if compression == zipfile.ZIP_STORED else "Error -3") in message
    assert f"delete {path} and download it again" in message


def test_damaged_tar_gz_member_names_the_archive_and_the_member(tmp_path):
    # Rebuild the fake archive uncompressed-in-tar, then damage the gzip stream inside the 'train' member.
    raw = gzip.decompress((DATA / "cifar100" / "cifar-100-python.tar.gz").read_bytes())
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        offsets = {m.name: m.offset_data for m in tar.getmembers()}
    assert "cifar-100-python/train" in offsets
    packed = bytearray(gzip.compress(raw, mtime=0))
    # A deflate stream cannot be damaged at a chosen member without inflating: flip bytes far into the
    # compressed stream and accept whichever member they land in, but it must be named.
    for i in range(len(packed) // 2, len(packed) // 2 + 16):
        packed[i] ^= 0xFF
    root = tmp_path / "cifar"
    root.mkdir()
    (root / "cifar-100-python.tar.gz").write_bytes(bytes(packed))
    with pytest.raises(ValueError) as err:
        CIFARFS(root=str(root)).prepare_data()
    message = str(err.value)
    assert f"{root / 'cifar-100-python.tar.gz'} is damaged: its member 'cifar-100-python/" in message
    assert "download it again" in message


# ----------------------------------------------------------------------------- 3. downloads without network
@pytest.fixture
def no_network(monkeypatch):
    """urllib's opener fails as it does offline; records the URLs asked for."""
    asked = []

    def offline(self, request, *args, **kwargs):
        asked.append(request if isinstance(request, str) else request.full_url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", offline)
    return asked


@pytest.mark.parametrize(
    "bundle, files",
    [
        (Omniglot, ["images_background.zip", "images_evaluation.zip"]),
        (CIFARFS, ["cifar-100-python.tar.gz"]),
        (CUB, ["CUB_200_2011.tgz"]),
    ],
    ids=["Omniglot", "CIFARFS", "CUB"],
)
def test_download_without_network_names_the_url_and_where_to_put_the_files(bundle, files, no_network, tmp_path):
    root = tmp_path / "new"
    with pytest.raises(DownloadError) as err:
        bundle(root=str(root), download=True).prepare_data()
    assert isinstance(err.value, OSError) and isinstance(err.value.__cause__, urllib.error.URLError)
    message = str(err.value)
    assert no_network and f"could not download {no_network[0].replace('http:', 'https:')}" in message
    for name in files:
        assert str(root / name) in message
    assert "Temporary failure in name resolution" in message
    assert not [p for p in root.iterdir() if p.is_file()]  # no half-written file left behind


def test_cli_download_without_network_is_a_clear_error(no_network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--model", "ProtoNet", "--data", "Omniglot", "--data.root", str(tmp_path / "o")]
    with pytest.raises(DownloadError, match=r"could not download https://raw.githubusercontent.com/brendenlake"):
        make_cli([*args, "--data.download", "true", "--trainer.fast_dev_run", "1"])


def test_files_put_by_hand_are_used_without_network(no_network, tmp_path):
    root = tmp_path / "o"
    root.mkdir()
    for name in ("images_background.zip", "images_evaluation.zip"):
        shutil.copy(DATA / "omniglot" / name, root / name)
    assert Omniglot(root=str(root), download=True, rotations=False).load_split("test").num_classes == 4
    assert no_network == []


# ----------------------------------------------------------------------------- 4. image files and caches
def image_folder(root: Path, classes: int = 2, per_class: int = 3, size: int = 16) -> Path:
    from fake_data import write_imagefolder

    return write_imagefolder(root, classes=classes, per_class=per_class, size=size)


def test_an_image_above_pils_pixel_limit_is_named_with_the_option_to_raise_it(tmp_path, monkeypatch):
    from PIL import Image

    from datamodules import EpisodicImageFolder

    root = image_folder(tmp_path / "data")
    big = root / "train" / "train_class0" / "big.png"
    Image.new("RGB", (120, 100)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # PIL refuses twice its limit: 12000 pixels is over
    monkeypatch.delenv("LIGHTNING_META_MAX_IMAGE_PIXELS", raising=False)
    dm = EpisodicImageFolder(root=str(root), image_size=16, ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"image '.*big.png' has 12,000 pixels, above PIL's limit of 5,000 .*") as err:
        dm.load_split("train")
    assert "LIGHTNING_META_MAX_IMAGE_PIXELS=12000" in str(err.value) and "corrupt" not in str(err.value)
    monkeypatch.setenv("LIGHTNING_META_MAX_IMAGE_PIXELS", "12000")
    assert len(EpisodicImageFolder(root=str(root), image_size=16).load_split("train").images) == 7
    assert Image.MAX_IMAGE_PIXELS == 5000  # the limit is raised for our decoding only


@pytest.mark.parametrize("name", ["photo.heic", "drawing.svg", "scan.pdf"])
def test_an_image_in_a_format_pil_cannot_read_is_named_not_skipped(name, tmp_path):
    from datamodules import EpisodicImageFolder

    root = image_folder(tmp_path / "data")
    (root / "val" / "val_class1" / name).write_bytes(b"not for PIL")
    (root / "val" / "val_class1" / "notes.txt").write_text("skipped: not an image")
    dm = EpisodicImageFolder(root=str(root), image_size=16, ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match=rf"val_class1 holds 1 image\(s\) in a format PIL cannot read \({name}\); "
                                         "convert them to .png or .jpg"):  # fmt: skip
        dm.load_split("val")


def test_a_read_only_cache_dir_is_named_before_reading(tmp_path):
    from datamodules import EpisodicImageFolder

    root = image_folder(tmp_path / "data")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        dm = EpisodicImageFolder(root=str(root), image_size=16, cache_dir=str(read_only / "cache"))
        with pytest.raises(ValueError, match=r"cache_dir='.*ro/cache': .*ro is not writable, so the "
                                             "EpisodicImageFolder image cache cannot be written there; pass a "
                                             "writable folder as --data.cache_dir"):  # fmt: skip
            dm.load_split("train")
        # A cache already built there is read: a read-only shared cache is fine.
        read_only.chmod(0o755)
        EpisodicImageFolder(root=str(root), image_size=16, cache_dir=str(read_only / "cache")).load_split("train")
        read_only.chmod(0o555)
        (read_only / "cache").chmod(0o555)
        again = EpisodicImageFolder(root=str(root), image_size=16, cache_dir=str(read_only / "cache"))
        assert len(again.load_split("train").images) == 6
    finally:
        for folder in (read_only, read_only / "cache"):
            if folder.exists():
                folder.chmod(0o755)


def test_two_image_folders_sharing_a_cache_dir_keep_their_own_caches(tmp_path):
    from datamodules import EpisodicImageFolder

    first, second = image_folder(tmp_path / "a", classes=2), image_folder(tmp_path / "b", classes=3)
    cache = tmp_path / "cache"
    a = EpisodicImageFolder(root=str(first), image_size=16, cache_dir=str(cache))
    b = EpisodicImageFolder(root=str(second), image_size=16, cache_dir=str(cache))
    assert a.cache_path("train") != b.cache_path("train")
    a.load_split("train"), b.load_split("train")
    assert a.cache_path("train").exists() and b.cache_path("train").exists()  # not one file rebuilt by turns
    split_a, split_b = tmp_path / "a.json", tmp_path / "b.json"
    for path in (split_a, split_b):
        path.write_text('{"train": ["train_class0"], "val": [], "test": []}')
    one = EpisodicImageFolder(root=str(first / "train"), split_file=str(split_a), image_size=16)
    two = EpisodicImageFolder(root=str(first / "train"), split_file=str(split_b), image_size=16)
    assert one.cache_path("train") != two.cache_path("train")
