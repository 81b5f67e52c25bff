"""Any torchvision classification model as a backbone, by name."""

from __future__ import annotations

from typing import Any

from torch import nn

from .wrapper import WrappedBackbone

HEAD_NAMES = ("fc", "classifier", "heads", "head")


def remove_classifier(model: nn.Module) -> int:
    """Replace the last ``nn.Linear`` of ``model``'s ``fc``/``classifier``/``heads`` by an identity; return its inputs.

    Only the last linear layer goes, so pretrained hidden layers of a classifier (MobileNetV3's,
    VGG's) stay part of the embedding.
    """
    for attr in HEAD_NAMES:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Module):
            linears = [(name, m) for name, m in head.named_modules() if isinstance(m, nn.Linear)]
            if linears:
                name, last = linears[-1]
                parent, _, child = name.rpartition(".")
                setattr(head.get_submodule(parent), child, nn.Identity())
                return last.in_features
    raise ValueError(
        f"cannot find the classifier of {type(model).__name__}: no nn.Linear in {'/'.join(HEAD_NAMES)}; "
        "use TimmBackbone or wrap the model yourself"
    )


def replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Give the first ``nn.Conv2d`` ``in_channels`` inputs (pretrained RGB filters are adapted when loaded)."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        conv.dilation,  # type: ignore[arg-type]
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def torchvision_blocks(model: nn.Module) -> list[nn.Module]:
    """The stages of a torchvision model.

    ``layer1``-``layer4`` for ResNets, the encoder layers for ViTs, else the children of ``features``
    that hold parameters (EfficientNet, MobileNet, ConvNeXt, DenseNet, VGG).
    """
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return [getattr(model, f"layer{i}") for i in range(1, 5)]
    encoder_layers = getattr(getattr(model, "encoder", None), "layers", None)
    container = encoder_layers if isinstance(encoder_layers, nn.Module) else getattr(model, "features", None)
    if not isinstance(container, nn.Module):
        return []
    return [m for m in container.children() if any(True for _ in m.parameters())]


def min_image_size(name: str) -> int:
    """The smallest image side torchvision's weights metadata gives for ``name`` (1 if it has none)."""
    from torchvision.models import get_model_weights

    try:
        weights = list(get_model_weights(name))
    except (ValueError, KeyError):
        return 1
    return int(min(weights[0].meta.get("min_size", (1, 1)))) if weights else 1


class TorchvisionBackbone(WrappedBackbone):
    """A torchvision classification model by name, with its last linear layer replaced by an identity.

    Built with ``torchvision.models.get_model(name, weights=None)``; ``embedding_dim`` is the input
    size of the removed layer (512 for ``resnet18``). Weights are never downloaded: ``pretrained``
    is a local state-dict file, or True for ``$LIGHTNING_META_CACHE/<name>.pth`` (default folder
    ``~/.cache/lightning_meta/weights``).

    Args:
        name: a ``torchvision.models.list_models()`` name, e.g. ``"resnet18"``.
        pretrained: False, True (the cache file) or the path of a state dict of the same model.
        freeze: False or 0 trains everything, True freezes everything, ``k`` trains only the last
            ``k`` stages (:func:`torchvision_blocks`: ``layer1``-``layer4`` for ResNets) and what
            follows them. Frozen batch norms stay in eval mode.
        in_channels: image channels; other than 3 replaces the first convolution (pretrained RGB
            filters are summed or tiled into it).
        task_batch_norm: per-task batch norm (:func:`~lightning_meta.backbones.task_batch_norm`), for MAML.
        model_kwargs: further ``get_model`` arguments (``image_size`` for ViTs, ...).
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
        from torchvision.models import get_model

        model = get_model(name, weights=None, **(model_kwargs or {}))
        embedding_dim = remove_classifier(model)
        replace_first_conv(model, in_channels)
        super().__init__(model, embedding_dim, in_channels, min_image_size(name))
        self.name = name
        how = f"torch.save(torchvision.models.get_model({name!r}, weights='DEFAULT').state_dict(), '{{path}}')"
        self.prepare(name, pretrained, how, torchvision_blocks(model), freeze, task_batch_norm)
