"""Backbones: the networks that the algorithms wrap.

The contract:

- A backbone is a plain ``nn.Module`` (no Lightning) taking images ``[N, C, H, W]`` and returning
  features ``[N, D]``, with an ``embedding_dim: int`` attribute equal to ``D``. Flattening an
  episode's task dimension and restoring it is the algorithm's job, not the backbone's; the
  backbones here also accept extra leading dimensions (``[..., C, H, W]`` to ``[..., D]``).
- Metric methods (ProtoNet, Matching Networks) use the features as they are. Gradient-based methods
  (MAML, Reptile) get an explicit head: ``out_features`` on :class:`Conv4`, :class:`ResNet12` and
  :class:`WideResNet` adds a linear layer after the embedding (``embedding_dim`` still names the
  features before it), or the method is given one.
- MAML normalises every task with its own statistics: build backbones with
  ``track_running_stats=False`` (:class:`TaskBatchNorm2d`), or convert any network with
  :func:`task_batch_norm` (``task_batch_norm=True`` on the wrappers).
- Backbones check their input cheaply at every forward: a channel count other than their
  ``in_channels`` or an image side below their ``min_image_size`` is a ``ValueError`` that says
  which setting to change, as is an ``image_size`` below ``min_image_size`` at construction.
- Library networks come by name (:class:`TimmBackbone`, :class:`TorchvisionBackbone`) with
  pretrained weights from local files only and ``freeze`` options (see :mod:`.weights`).
"""

from .batchnorm import TaskBatchNorm2d, batch_norm_2d, task_batch_norm, vmap_safe_batch_norm
from .conv4 import Conv4, to_channels_last
from .mlp import MLP
from .resnet12 import DropBlock, ResNet12
from .timm import TimmBackbone
from .torchvision_models import TorchvisionBackbone
from .weights import freeze_blocks, load_pretrained, weights_dir
from .wrapper import WrappedBackbone
from .wrn import WRN28_10, WideResNet

__all__ = [
    "MLP",
    "WRN28_10",
    "Conv4",
    "DropBlock",
    "ResNet12",
    "TaskBatchNorm2d",
    "TimmBackbone",
    "TorchvisionBackbone",
    "WideResNet",
    "WrappedBackbone",
    "batch_norm_2d",
    "freeze_blocks",
    "load_pretrained",
    "task_batch_norm",
    "to_channels_last",
    "vmap_safe_batch_norm",
    "weights_dir",
]
