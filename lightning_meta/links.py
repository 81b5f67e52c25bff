"""Data-to-model links: the data states the episode and image shapes once, and the model takes them.

The CLI applies them to the parsed configuration before anything is built
(:func:`link_data_to_model`): the data's ``ways`` sizes every classifier head (a gradient method's
backbone ``out_features`` or explicit head, a module's own ``ways``), its ``image_size`` and
``channels`` size every backbone that takes ``image_size`` or ``in_channels``, at any depth (an
:class:`~lightning_meta.Aggregate`'s members too). A model setting left unset, or at its class's
default, is filled in; one stated with another value than the data's stops the run at start with
the two options named. ``num_train_classes`` needs the bundle's files, so the CLI links it to the
pre-training classifier once the datamodule is built (:func:`link_train_classes`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from typing import Any

#: Data setting -> the backbone parameter it sizes.
BACKBONE_LINKS = {"image_size": "image_size", "channels": "in_channels"}


def _class(class_path: Any) -> type | None:
    if isinstance(class_path, type):
        return class_path
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module_name, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return None  # jsonargparse names a class it cannot import
    return found if isinstance(found, type) else None


def _defaults(cls: type) -> dict[str, Any]:
    """The constructor's parameters and their defaults (``inspect.Parameter.empty`` for required ones)."""
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
    return {name: p.default for name, p in parameters.items()}


def _is_class_config(node: Any) -> bool:
    return hasattr(node, "get") and isinstance(node.get("class_path"), str) and node.get("init_args") is not None


def data_shapes(data: Any) -> dict[str, Any]:
    """The shape settings a parsed ``data`` config states: ``ways``, ``image_size``, ``channels`` (those it has).

    ``channels`` is the bundle's argument where it takes one (``ImageFolder``), else its class's
    ``channels`` (1 for Omniglot, 3 for the colour bundles). Regression data (``task =
    "regression"``) has no ``ways`` to link.
    """
    if not _is_class_config(data):
        return {}
    cls, args = _class(data["class_path"]), data["init_args"]
    # int(): the parsed values are jsonargparse PositiveInt instances, which a config dump cannot write.
    shapes = {key: int(args[key]) for key in ("ways", "image_size", "channels") if args.get(key) is not None}
    if "channels" not in shapes and isinstance(getattr(cls, "channels", None), int):
        shapes["channels"] = cls.channels  # type: ignore[union-attr]
    if cls is not None and getattr(cls, "task", "classification") != "classification":
        shapes.pop("ways", None)
    return shapes


def _set(node: Any, cls: type, parameter: str, value: Any, where: str, data_key: str) -> None:
    """Give ``node``'s ``parameter`` the data's ``value``, unless it states another one (then raise)."""
    defaults = _defaults(cls)
    if parameter not in defaults:
        return
    args = node["init_args"]
    stated = args.get(parameter)
    if stated is None or stated == value or stated == defaults[parameter]:
        args[parameter] = value
        return
    raise ValueError(
        f"--{where}.init_args.{parameter}={stated} but --data.{data_key}={value}: the model takes its {parameter} "
        f"from the data, so state it once: drop the model's {parameter} (or set --data.{data_key} {stated})"
    )


def _models(node: Any, where: str) -> Iterator[tuple[Any, type, str]]:
    """Every module config in the tree of ``node``: itself and nested members (an Aggregate's)."""
    cls = _class(node.get("class_path")) if _is_class_config(node) else None
    if cls is None:
        return
    yield node, cls, where
    for key, value in node["init_args"].items():
        if isinstance(value, list):
            for i, item in enumerate(value):
                if _is_class_config(item) and _is_module(_class(item.get("class_path"))):
                    yield from _models(item, f"{where}.init_args.{key}[{i}]")


def _is_module(cls: type | None) -> bool:
    from lightning.pytorch import LightningModule

    return isinstance(cls, type) and issubclass(cls, LightningModule)


def link_data_to_model(model: Any, data: Any) -> None:
    """Size the parsed ``model`` config from the parsed ``data`` config, in place; ValueError on a disagreement.

    Args:
        model: the ``model`` of a parsed LightningCLI config (``class_path`` and ``init_args``).
        data: its ``data``.
    """
    from .bases.gradient import GradientModule

    shapes = data_shapes(data)
    for node, cls, where in _models(model, "model"):
        args = node["init_args"]
        backbone = args.get("backbone")
        backbone_cls = _class(backbone.get("class_path")) if _is_class_config(backbone) else None
        for data_key, parameter in BACKBONE_LINKS.items():
            if backbone_cls is not None and data_key in shapes:
                _set(backbone, backbone_cls, parameter, shapes[data_key], f"{where}.init_args.backbone", data_key)
        if "ways" not in shapes:
            continue
        _set(node, cls, "ways", shapes["ways"], where, "ways")
        if not issubclass(cls, GradientModule):
            continue
        # A gradient method classifies with its head: the explicit one, else the backbone's.
        head = args.get("head")
        head_cls = _class(head.get("class_path")) if _is_class_config(head) else None
        if head_cls is not None:
            _set(head, head_cls, "out_features", shapes["ways"], f"{where}.init_args.head", "ways")
        elif backbone_cls is not None:
            _set(backbone, backbone_cls, "out_features", shapes["ways"], f"{where}.init_args.backbone", "ways")


def link_train_classes(model: Any, data: Any) -> None:
    """Give a built pre-training module (Baseline, RFS) one classifier output per training class of ``data``.

    For a datamodule that pre-trains on labelled batches (``train_batches="labelled"``), whose
    ``num_train_classes`` needs the training split, so it is linked once both are built (a plain
    ``link_arguments`` would hand ``num_classes`` to every module, and to the hyperparameters of
    their checkpoints). A model without a classifier gets one; one with another count is refused.
    """
    if getattr(data, "train_batches", None) != "labelled" or not hasattr(model, "num_classes"):
        return
    classes = int(data.num_train_classes)
    if model.num_classes is None:
        model._build_classifier(classes)  # also records num_classes in the hyperparameters
    elif model.num_classes != classes:
        raise ValueError(
            f"--model.init_args.num_classes={model.num_classes} but the training split of {type(data).__name__} "
            f"has {classes} classes; drop num_classes (the CLI takes it from the data)"
        )


__all__ = ["BACKBONE_LINKS", "data_shapes", "link_data_to_model", "link_train_classes"]
