"""Checks of image inputs against what a backbone was built for: channels and the smallest image side."""

from __future__ import annotations

from torch import Tensor


def check_image_size(owner: str, image_size: int, min_size: int, why: str) -> None:
    """Raise ``ValueError`` at construction when ``image_size`` is below the backbone's smallest image side.

    Args:
        owner: the backbone's name, for the message.
        image_size: the side the backbone was asked to be built for.
        min_size: the smallest side its downsampling leaves at least one pixel for.
        why: what needs that size (e.g. "four 2x2 max-pooling blocks").
    """
    if image_size < min_size:
        raise ValueError(
            f"image_size={image_size} is too small for {why}: {owner} needs images of at least "
            f"{min_size}x{min_size} pixels; resize the data (--data.image_size {min_size} or more)"
        )


def check_images(owner: str, x: Tensor, in_channels: int, min_size: int) -> None:
    """Raise ``ValueError`` when ``[..., C, H, W]`` images have other channels than ``in_channels`` or are too small.

    Only integer comparisons of the shape, so it costs nothing per forward (and works under vmap).
    """
    if x.dim() < 3:
        raise ValueError(f"{owner} takes images [..., C, H, W]; got a tensor of shape {tuple(x.shape)}")
    channels, height, width = x.shape[-3:]
    if channels != in_channels:
        raise ValueError(
            f"the data has {channels} channel(s) and the backbone expects in_channels={in_channels}; "
            f"set --data.channels {in_channels} (where the datamodule has it) or the backbone's "
            f"in_channels to {channels}"
        )
    if height < min_size or width < min_size:
        raise ValueError(
            f"{owner} needs images of at least {min_size}x{min_size} pixels; got {height}x{width}; "
            f"resize the data (--data.image_size {min_size} or more)"
        )


def check_backbone_fits_data(backbone: object, data: object) -> None:
    """Raise ``ValueError`` at setup when image data cannot go through ``backbone``, naming the options to change.

    ``data`` is the datamodule: an image bundle has ``image_size``. A vector backbone (``MLP``, with
    ``in_features`` and no ``in_channels``) cannot take images; a backbone built for one image side
    (``fixed_image_size``, e.g. ``Conv4`` with a head after max-pooling) cannot take another.
    """
    image_size = getattr(data, "image_size", None)
    if not isinstance(image_size, int):
        return
    name, data_name = type(backbone).__name__, type(data).__name__
    in_features = getattr(backbone, "in_features", None)
    if isinstance(in_features, int) and not hasattr(backbone, "in_channels"):
        raise ValueError(
            f"--model.backbone {name} takes vectors of in_features={in_features} values, but "
            f"{data_name} gives {image_size}x{image_size} images; use an image backbone such as "
            "lightning_meta.Conv4 or lightning_meta.ResNet12 (MLP is for vector data such as Sinusoid)"
        )
    built_for = getattr(backbone, "image_size", None)
    if getattr(backbone, "fixed_image_size", False) and isinstance(built_for, int) and built_for != image_size:
        raise ValueError(
            f"the backbone {name} was built for image_size={built_for} (its head takes that size's features) but "
            f"{data_name} gives image_size={image_size}; set --model.backbone.init_args.image_size {image_size} "
            f"or --data.image_size {built_for}"
        )
