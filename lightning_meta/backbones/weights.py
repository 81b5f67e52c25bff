"""Pretrained weights from local files (never downloaded) and freezing, shared by the timm and torchvision wrappers."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

#: State-dict keys of classifiers that a backbone drops (its head is replaced by an identity).
CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "heads.", "last_linear.")
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


def weights_dir() -> Path:
    """Where ``pretrained=True`` looks: ``$LIGHTNING_META_CACHE``, else ``~/.cache/lightning_meta/weights``."""
    folder = os.environ.get("LIGHTNING_META_CACHE")
    return Path(folder).expanduser() if folder else Path.home() / ".cache" / "lightning_meta" / "weights"


def find_weights(source: bool | str | os.PathLike[str], name: str, how_to_save: str) -> Path:
    """The local file of ``pretrained=source``: that path, or for True ``<weights_dir()>/<name>.pth|.pt|.safetensors``.

    ``how_to_save`` is a command that writes the file, with ``{path}`` standing for where it goes.

    Raises:
        FileNotFoundError: naming every path looked at and how to provide the file; nothing is downloaded.
    """
    if source is True:
        candidates = [weights_dir() / f"{name}{suffix}" for suffix in WEIGHT_SUFFIXES]
    else:
        candidates = [Path(os.fspath(source)).expanduser()]  # type: ignore[arg-type]
    for path in candidates:
        if path.is_file():
            return path
    looked = " or ".join(str(p) for p in candidates)
    how = how_to_save.replace("{path}", str(candidates[0]))
    raise FileNotFoundError(
        f"pretrained={source!r}: no weights file for {name!r} at {looked}. Weights are never downloaded; save a "
        f"state dict there on a machine that has them ({how}), set $LIGHTNING_META_CACHE to the folder "
        f"that holds {name}.pth, or pass pretrained=PATH"
    )


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` or ``.pt``/``.pth`` state dict (or a checkpoint's ``state_dict``/``model``)."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:  # pragma: no cover - safetensors comes with timm
            raise ImportError(f"reading {path} needs safetensors: pip install safetensors") from err
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """RGB first-layer filters for ``in_channels`` inputs: summed for one channel, else tiled and rescaled (as timm)."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def load_pretrained(module: nn.Module, source: bool | str | os.PathLike[str], name: str, how_to_save: str) -> None:
    """Load ``module``'s weights from the local file that ``source`` names (see :func:`find_weights`).

    Classifier weights that ``module`` lacks (``fc.``, ``classifier.``, ``head.``, ...) are ignored, and
    first-layer filters for another number of input channels are adapted (:func:`adapt_input_conv`);
    any other missing, unexpected or differently shaped key is an error.

    Raises:
        FileNotFoundError: see :func:`find_weights`.
        ValueError: when the remaining keys or shapes do not match ``module``'s.
    """
    if source is False or source is None:
        return
    path = find_weights(source, name, how_to_save)
    state = read_state_dict(path)
    own = module.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(CLASSIFIER_PREFIXES)}
    for key, value in state.items():
        target = own.get(key)
        if target is not None and value.dim() == 4 and target.dim() == 4 and value.shape[1] != target.shape[1]:
            if value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
                state[key] = adapt_input_conv(value, target.shape[1])
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        ]
        raise ValueError(
            f"the weights in {path} do not fit {name!r} (classifier keys aside): {'; '.join(problems)}. "
            f"Save the state dict of the same architecture ({how_to_save.replace('{path}', str(path))})"
        )
    module.load_state_dict(state)


def freeze_blocks(module: nn.Module, blocks: Sequence[nn.Module], option: bool | int) -> list[nn.Module]:
    """Freeze ``module``: ``option`` False or 0 trains all, True freezes all, ``k`` trains only the last ``k`` blocks.

    With ``k``, every parameter registered before the first one of ``blocks[-k]`` is frozen: the
    stem and the earlier blocks, while whatever follows the last block (a final norm) still trains.
    Frozen parameters get ``requires_grad=False``.

    Returns:
        the batch norms whose parameters are all frozen; keep them in eval mode (see
        :class:`~lightning_meta.backbones.wrapper.WrappedBackbone`) so their statistics stay fixed too.

    Raises:
        ValueError: when ``k`` is negative or more than the number of blocks.
    """
    params = list(module.parameters())
    if option is True:
        stop = len(params)
    elif option is False or option == 0:
        return []
    else:
        if not isinstance(option, int) or option < 0 or option > len(blocks):
            raise ValueError(
                f"freeze={option!r} must be a bool or a number of trainable blocks between 0 and {len(blocks)} "
                f"(this backbone has {len(blocks)} blocks)"
            )
        first = next(iter(blocks[-option].parameters()))
        stop = next(i for i, p in enumerate(params) if p is first)
    frozen = {id(p) for p in params[:stop]}
    for p in params[:stop]:
        p.requires_grad_(False)
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    owned = {m: [id(p) for p in m.parameters(recurse=False)] for m in norms}
    return [m for m in norms if option is True or (owned[m] and all(i in frozen for i in owned[m]))]
