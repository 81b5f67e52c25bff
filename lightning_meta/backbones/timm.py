"""Any timm model (Wightman 2019) as a backbone, by name; timm is an optional dependency."""

from __future__ import annotations

from typing import Any

from torch import nn

from .wrapper import WrappedBackbone


def import_timm() -> Any:
    """``import timm``, or an ``ImportError`` that says how to install it."""
    try:
        import timm
    except ImportError as err:
        raise ImportError('TimmBackbone needs timm: pip install "lightning-meta[timm]" (or pip install timm)') from err
    return timm


def timm_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that timm lists in ``feature_info`` and that hold parameters: its feature stages.

    These are ``layer1``-``layer4`` for ResNets, ``stages.0``-``stages.3`` for ConvNeXt and every
    transformer block for ViTs.
    """
    names = [info["module"] for info in getattr(model, "feature_info", [])]
    modules = [model.get_submodule(name) for name in names]
    return [m for m in modules if any(True for _ in m.parameters())]


class TimmBackbone(WrappedBackbone):
    """A `timm <https://github.com/huggingface/pytorch-image-models>`_ model by name, without its classifier.

    Built with ``timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)``;
    ``embedding_dim`` is the model's ``num_features``. Weights are never downloaded: ``pretrained``
    is a local state-dict file (``.pt``, ``.pth`` or ``.safetensors``), or True for
    ``$LIGHTNING_META_CACHE/<name>.pth`` (default folder ``~/.cache/lightning_meta/weights``).

    Args:
        name: a ``timm.list_models()`` name, e.g. ``"resnet18"`` or ``"resnet10t"``.
        pretrained: False, True (the cache file) or the path of a state dict of the same model.
        freeze: False or 0 trains everything, True freezes everything, ``k`` trains only the last
            ``k`` feature stages (:func:`timm_blocks`) and what follows them. Frozen batch norms stay
            in eval mode.
        in_channels: image channels (RGB pretrained filters are adapted for others, as timm does).
        task_batch_norm: per-task batch norm (:func:`~lightning_meta.backbones.task_batch_norm`), for MAML.
        model_kwargs: further ``timm.create_model`` arguments (``drop_rate``, ``img_size``, ...).
    """

    def __init__(
        self,
        name: str,
        pretrained: bool | str = False,
        freeze: bool | int = False,
        in_channels: int = 3,
        task_batch_norm: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        timm = import_timm()
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels, **(model_kwargs or {}))
        min_size = (getattr(model, "pretrained_cfg", None) or {}).get("min_input_size") or (in_channels, 1, 1)
        super().__init__(model, int(model.num_features), in_channels, int(min(min_size[1:])))
        self.name = name
        how = f"torch.save(timm.create_model({name!r}, pretrained=True).state_dict(), '{{path}}')"
        self.prepare(name, pretrained, how, timm_blocks(model), freeze, task_batch_norm)
