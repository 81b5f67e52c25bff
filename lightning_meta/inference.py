"""Use a trained checkpoint: load it in one call, predict one episode, or classify folders of images.

::

    model = load_checkpoint("lightning_logs/protonet_omniglot_5w1s/version_0/checkpoints/last.ckpt")
    probabilities = predict_episode(model, support_x, support_y, query_x)  # [Q, N]

From the shell, ``lightning-meta predict --ckpt_path X --support DIR --query DIR --output out.csv``
runs :func:`predict_folders`.
"""

from __future__ import annotations

import csv
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from datamodules.episodes import EpisodeBatch
from datamodules.files import atomic_file
from datamodules.images import decode_image, image_files

from .bases.episodic import EpisodicModule, at_least_float32
from .checkpoints import load_checkpoint, read_checkpoint, trusting


# ----------------------------------------------------------------------------- one episode
def predict_episode(model: EpisodicModule, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
    """Class probabilities ``[Q, N]`` of one episode's queries; no Trainer needed.

    ``support_x`` is ``[N*K, ...]`` model input (floats; uint8 images are scaled to [0, 1] as the
    datamodules do), ``support_y`` the ``[N*K]`` labels ``0..N-1``, ``query_x`` ``[Q, ...]``.
    Gradient-based modules (MAML, Reptile: ``needs_grad_in_eval``) adapt on the support set, so
    this runs them with gradients on; it cannot run inside ``torch.inference_mode``. Regression
    models (float ``support_y``) return their predictions ``[Q, D]``. The model is put in eval mode.
    """
    if support_x.dim() < 2 or query_x.dim() != support_x.dim() or support_x.shape[1:] != query_x.shape[1:]:
        raise ValueError(
            f"support_x {tuple(support_x.shape)} and query_x {tuple(query_x.shape)} must be [items, ...] with the "
            "same item shape (one episode, no task dimension)"
        )
    if support_y.shape[:1] != support_x.shape[:1] or (support_y.dim() != 1 and not support_y.is_floating_point()):
        raise ValueError(
            f"support_y {tuple(support_y.shape)} must be [{support_x.shape[0]}], one label per support item"
        )
    for name, x in (("support_x", support_x), ("query_x", query_x), ("support_y", support_y)):
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"{name} holds {int((~torch.isfinite(x)).sum())} NaN or infinite value(s); every prediction would "
                "be NaN: clean or drop those inputs"
            )
    regression = support_y.is_floating_point()
    if not regression:
        present = torch.unique(support_y)
        if present.min() < 0 or not torch.equal(present.cpu(), torch.arange(int(present.max()) + 1)):
            raise ValueError(
                f"support_y must hold every label 0..N-1 at least once, got the labels {present.tolist()}; "
                "number the classes 0..N-1"
            )
    if model.needs_grad_in_eval and torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{type(model).__name__} adapts on the support set with gradients, which inference mode forbids; "
            "call predict_episode outside torch.inference_mode()"
        )
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")

    def prepared(x: Tensor) -> Tensor:
        x = x.float().div(255) if x.dtype == torch.uint8 else x
        return x.to(device).unsqueeze(0)

    query_y = (
        torch.zeros(query_x.shape[0], *support_y.shape[1:], dtype=support_y.dtype)
        if regression
        else torch.zeros(query_x.shape[0], dtype=torch.long)
    )
    batch = EpisodeBatch(prepared(support_x), support_y.to(device).unsqueeze(0), prepared(query_x),
                         query_y.to(device).unsqueeze(0))  # fmt: skip
    model.eval()
    # The adaptation curve would measure losses against the placeholder query labels: skip it.
    curve = getattr(model, "adaptation_curve", None)
    if curve is not None:
        setattr(model, "adaptation_curve", False)  # noqa: B010  (a plain attribute of MAML and Reptile)
    try:
        with torch.enable_grad() if model.needs_grad_in_eval else torch.no_grad():
            predictions = model.episode_outputs(batch).predictions[0].detach()
    finally:
        if curve is not None:
            setattr(model, "adaptation_curve", curve)  # noqa: B010
    return at_least_float32(predictions) if regression else at_least_float32(predictions).softmax(-1)


# ----------------------------------------------------------------------------- folders of images
def _first_conv(backbone: nn.Module) -> nn.Module | None:
    return next((m for m in backbone.modules() if isinstance(m, nn.Conv2d | nn.Conv1d | nn.Conv3d)), None)


@dataclass
class Preprocessing:
    """How :func:`predict_folders` turns image files into model input, as the checkpoint's training data did.

    Attributes:
        image_size: side of the square the images are resized to (Lanczos, aspect ratio not kept).
        channels: 1 (grayscale) or 3 (RGB).
        invert: replace each pixel ``v`` by ``255 - v`` (Omniglot's light strokes on a dark ground).
        source: where each setting came from, for messages.
        mean: per-channel mean subtracted from ``v / 255``; None: not normalised.
        std: per-channel standard deviation it is divided by; None: not normalised.
    """

    image_size: int
    channels: int
    invert: bool
    source: dict[str, str] = field(default_factory=dict)
    mean: list[float] | None = None
    std: list[float] | None = None

    def transform(self, images: Tensor) -> Tensor:
        """uint8 ``[N, C, S, S]`` images to model input, as the training data's ``transform_images`` did."""
        x = images.float().div(255)
        if self.mean is not None and self.std is not None:
            shape = (-1, 1, 1)
            x = (x - torch.tensor(self.mean).view(shape)) / torch.tensor(self.std).view(shape)
        return x


def _datamodule_class(hparams: dict[str, Any]) -> type | None:
    class_path = hparams.get("_class_path")
    if not isinstance(class_path, str):
        return None
    module_name, _, class_name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None
    return found if isinstance(found, type) else None


def preprocessing_of(
    checkpoint: dict[str, Any],
    model: EpisodicModule,
    image_size: int | None = None,
    channels: int | None = None,
    invert: bool | None = None,
    path: str | Path = "the checkpoint",
) -> Preprocessing:
    """The :class:`Preprocessing` of the checkpoint's training data; explicit arguments override it.

    The bundle declares them in its saved hyperparameters (``preprocessing``: image size,
    channels, inversion, normalisation; see ``CachedImageBundle.preprocessing``). For a checkpoint
    written before bundles declared them, ``image_size`` and ``channels`` come from the data's
    hyperparameters, else from the backbone's (``image_size``, ``in_channels``), and ``invert``
    from the data's ``invert`` argument or class (Omniglot stores light strokes on a dark ground,
    the inverse of its official PNGs). Raises ValueError for regression checkpoints and for a
    channel count the backbone cannot take.
    """
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    data_cls = _datamodule_class(data)
    data_name = data_cls.__name__ if data_cls is not None else data.get("_class_path", "unknown data")
    # What the bundle declared it did to its files; older checkpoints lack it, and the settings are
    # then read from the data's and the backbone's hyperparameters and the data's class.
    found = data.get("preprocessing")
    declared: dict[str, Any] = found if isinstance(found, dict) else {}
    data = {**data, **{k: v for k, v in declared.items() if k in ("image_size", "channels", "invert")}}
    conv = _first_conv(model.backbone)
    if (data_cls is not None and getattr(data_cls, "task", "classification") == "regression") or conv is None:
        raise ValueError(
            f"{path} is a {type(model).__name__} trained on {data_name}, a regression model (its backbone has no "
            "convolution); predict is for image classification checkpoints. For regression use "
            "lightning_meta.predict_episode(model, support_x, support_y, query_x) from Python"
        )
    backbone_args = (model.hparams.get("backbone") or {}) if hasattr(model, "hparams") else {}
    backbone_args = backbone_args.get("init_args", {}) if isinstance(backbone_args, dict) else {}
    source: dict[str, str] = {}

    if image_size is not None:
        source["image_size"] = "--image_size"
    elif isinstance(data.get("image_size"), int):
        image_size, source["image_size"] = data["image_size"], f"the checkpoint's data ({data_name}.image_size)"
    elif isinstance(backbone_args.get("image_size"), int):
        image_size, source["image_size"] = backbone_args["image_size"], "the checkpoint's backbone image_size"
    else:
        raise ValueError(
            f"{path} does not record the image size it was trained on; pass image_size= (--image_size) with the "
            "side of the square images of its training data"
        )
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be a positive integer")

    takes = int(getattr(conv, "in_channels", 0))
    if channels is not None:
        source["channels"] = "--channels"
    elif isinstance(data.get("channels"), int):
        channels, source["channels"] = data["channels"], f"the checkpoint's data ({data_name}.channels)"
    else:
        channels, source["channels"] = takes, "the checkpoint's backbone (its first convolution's in_channels)"
    if takes not in (1, 3):
        raise ValueError(
            f"the backbone of {path} takes {takes}-channel input, but image files decode to 1 (grayscale) or 3 (RGB) "
            f"channels; predict_folders cannot feed it images; use predict_episode with your own tensors"
        )
    if channels != takes:
        raise ValueError(
            f"channels={channels} (from {source['channels']}) but the backbone of {path} takes {takes}-channel "
            f"images; {'drop --channels or pass' if source['channels'] == '--channels' else 'pass'} --channels {takes}"
        )

    if invert is not None:
        source["invert"] = "--invert"
    else:
        # An older checkpoint's bundle: its invert argument (ImageFolder), else its class's (Omniglot's is True).
        stated = data.get("invert")
        invert = stated if isinstance(stated, bool) else bool(getattr(data_cls, "invert", False))
        source["invert"] = f"the checkpoint's data ({data_name})"
    mean, std = declared.get("mean"), declared.get("std")
    return Preprocessing(image_size, channels, invert, source, mean, std)


def load_images(files: list[Path], preprocessing: Preprocessing, root: Path) -> Tensor:
    """Decode ``files`` as the checkpoint's training data was decoded: ``[len(files), C, S, S]`` uint8.

    Matches :func:`datamodules.omniglot.read_zip` for Omniglot PNGs: PIL conversion to the mode,
    a Lanczos resize to the square, then the inversion.
    """
    mode = "L" if preprocessing.channels == 1 else "RGB"
    out = torch.empty(len(files), preprocessing.channels, preprocessing.image_size, preprocessing.image_size,
                      dtype=torch.uint8)  # fmt: skip
    for i, path in enumerate(files):
        out[i] = decode_image(path, preprocessing.image_size, mode, str(path.relative_to(root)))
    return 255 - out if preprocessing.invert else out


@dataclass
class FolderPredictions:
    """What :func:`predict_folders` returns (and wrote to its CSV).

    Attributes:
        classes: the support classes (folder names), in the order of the probability columns.
        queries: query paths relative to the query folder.
        predicted: the predicted class of each query.
        probabilities: ``[Q, N]`` class probabilities.
        true: the class folder of each query (None for a flat query folder).
        accuracy: fraction of labelled queries (folder named like a support class) predicted right.
        unscored: query class folders not named like any support class (their queries are predicted
            but not in the accuracy), with their number of queries.
        output: the CSV written.
        preprocessing: how the images were read.
    """

    classes: list[str]
    queries: list[str]
    predicted: list[str]
    probabilities: Tensor
    true: list[str | None]
    accuracy: float | None
    output: Path
    preprocessing: Preprocessing
    unscored: dict[str, int] = field(default_factory=dict)

    @property
    def scored(self) -> int:
        """How many queries count in the accuracy (in a folder named like a support class)."""
        return sum(t is not None and t in self.classes for t in self.true)

    def summary(self) -> str:
        """One line: what was written, and the accuracy over the queries it counts (saying which it does not)."""
        line = f"wrote {len(self.queries)} predictions over {len(self.classes)} classes to {self.output}"
        if self.accuracy is not None:
            line += f"; accuracy {self.accuracy:.3f} on the {self.scored} queries in class folders"
        if self.unscored:
            folders = ", ".join(f"{name} ({count})" for name, count in sorted(self.unscored.items()))
            line += (
                f"; {sum(self.unscored.values())} queries in folders named like no support class are not scored: "
                f"{folders}"
            )
        return line


def predict_folders(
    ckpt_path: str,
    support: str,
    query: str,
    output: str = "predictions.csv",
    image_size: int | None = None,
    channels: int | None = None,
    invert: bool | None = None,
    queries_per_episode: int = 100,
    trust_checkpoint: bool = False,
) -> FolderPredictions:
    """Classify a folder of query images with the classes of a support folder, and write a CSV.

    The support folder holds one folder per class, ``<class>/<image>`` (as many images per class
    as you have: the shots). The query folder holds images, either flat or as
    ``<class>/<image>``; in the second case the accuracy is reported too. Images are read as the
    checkpoint's training data was (image size, channels and Omniglot's inversion, see
    :func:`preprocessing_of`); the options override that.

    The CSV has a row per query: ``query`` (the path relative to the query folder),
    ``predicted_class``, ``probability`` (of that class), ``true_class`` (the query's class folder,
    empty for a flat folder), then ``prob_<class>`` for each support class.

    Args:
        ckpt_path: a lightning-meta classification checkpoint (``.ckpt``).
        support: folder of class folders with the labelled images.
        query: folder of the images to classify.
        output: the CSV file to write.
        image_size: side of the square images; default from the checkpoint.
        channels: 1 (grayscale) or 3 (RGB); default from the checkpoint.
        invert: invert the images (255 - v); default true for Omniglot checkpoints, else false.
        queries_per_episode: queries classified together in one episode. Backbones that normalise
            with the batch's statistics (MAML's per-task batch norm) see these queries together.
        trust_checkpoint: load a checkpoint that names Python code to run (only your own files);
            by default it is refused (checkpoints are loaded as data).
    """
    support_dir, query_dir = Path(support).expanduser(), Path(query).expanduser()
    for name, folder in (("support", support_dir), ("query", query_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{name}={folder} is not a folder; pass the folder of the {name} images")
    if queries_per_episode < 1:
        raise ValueError(f"queries_per_episode={queries_per_episode} must be a positive integer")
    out = Path(output).expanduser()
    if out.is_dir():
        raise ValueError(
            f"output={output} is a folder; pass the CSV file to write, e.g. --output {out / 'predictions.csv'}"
        )
    classes = sorted(p.name for p in support_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"support={support_dir} has no class folders; expected {support_dir}/<class>/<image>")
    support_files: list[Path] = []
    support_labels: list[int] = []
    for label, name in enumerate(classes):
        found = image_files(support_dir / name)
        if not found:
            raise ValueError(
                f"support class '{name}' ({support_dir / name}) has no image; add at least one image "
                f"(a file PIL reads: .png, .jpg, ...) or remove the folder"
            )
        support_files += found
        support_labels += [label] * len(found)
    query_files: list[Path] = []
    true: list[str | None] = []
    for path in image_files(query_dir):
        query_files.append(path)
        true.append(None)
    for sub in sorted(p for p in query_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in image_files(sub):
            query_files.append(path)
            true.append(sub.name)
    if not query_files:
        raise ValueError(f"query={query_dir} has no image; expected {query_dir}/<image> or {query_dir}/<class>/<image>")

    trust = trust_checkpoint or trusting()
    checkpoint = read_checkpoint(ckpt_path, trust=trust)
    model = load_checkpoint(ckpt_path, trust=trust)
    if not isinstance(model, EpisodicModule):
        raise ValueError(
            f"{ckpt_path} holds a {type(model).__name__}, which does not classify episodes; predict is for "
            "few-shot classification checkpoints"
        )
    preprocessing = preprocessing_of(checkpoint, model, image_size, channels, invert, ckpt_path)
    heads = [m for m in model.backbone.modules() if isinstance(m, nn.Linear)]
    if model.needs_grad_in_eval and heads and heads[-1].out_features != len(classes):
        raise ValueError(
            f"{type(model).__name__}'s backbone ends in {heads[-1].out_features} outputs (it was trained "
            f"{heads[-1].out_features}-way) but support={support_dir} has {len(classes)} classes; use "
            f"{heads[-1].out_features} class folders"
        )
    transform = preprocessing.transform
    support_x = transform(load_images(support_files, preprocessing, support_dir))
    support_y = torch.tensor(support_labels)
    parts = []
    for start in range(0, len(query_files), queries_per_episode):
        chunk = query_files[start : start + queries_per_episode]
        parts.append(predict_episode(model, support_x, support_y, transform(load_images(chunk, preprocessing,
                                                                                        query_dir))))  # fmt: skip
    probabilities = torch.cat(parts)
    best, index = probabilities.max(-1)
    predicted = [classes[i] for i in index.tolist()]
    relative = [p.relative_to(query_dir).as_posix() for p in query_files]
    labelled = [(t, p) for t, p in zip(true, predicted, strict=True) if t is not None and t in classes]
    accuracy = sum(t == p for t, p in labelled) / len(labelled) if labelled else None

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, "predictions CSV", text=True) as f:
        writer = csv.writer(f)
        writer.writerow(["query", "predicted_class", "probability", "true_class", *(f"prob_{c}" for c in classes)])
        for name, guess, p, truth, probs in zip(relative, predicted, best.tolist(), true, probabilities.tolist(),
                                                strict=True):  # fmt: skip
            writer.writerow([name, guess, f"{p:.6f}", truth or "", *(f"{v:.6f}" for v in probs)])
    unscored: dict[str, int] = {}
    for truth in true:
        if truth is not None and truth not in classes:
            unscored[truth] = unscored.get(truth, 0) + 1
    return FolderPredictions(classes, relative, predicted, probabilities, true, accuracy, out, preprocessing, unscored)
