"""Train-time augmentations that work on whole batches of episodes on the device."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(images: torch.Tensor, padding: int = 8, flip: bool = True) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, drawn independently per image.

    Args:
        images: ``[..., C, H, W]`` float images (any leading dimensions, e.g. tasks and examples).
        padding: pixels of zero padding on each side before cropping back to ``H x W``.
        flip: also flip each image left-right with probability 1/2.

    Uses the global torch RNG of ``images``' device, which ``seed_everything`` seeds.
    """
    if padding < 0:
        raise ValueError(f"padding={padding} must be >= 0")
    *lead, c, h, w = images.shape
    x = images.reshape(-1, c, h, w)
    n, device = x.shape[0], x.device
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=device)
    rows = dy + torch.arange(h, device=device)
    cols = dx + torch.arange(w, device=device)
    if flip:
        flipped = torch.rand(n, 1, device=device) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    out = padded[
        torch.arange(n, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    return out.reshape(*lead, c, h, w)


__all__ = ["random_crop_flip"]
