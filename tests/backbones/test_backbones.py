"""Every backbone against the contract: shapes, embedding_dim, a ProtoNet and a MAML step, input checks."""

import sys
from collections.abc import Callable

import pytest
import torch
from episode_factory import make_episodes
from torch import nn

import lightning_meta
from lightning_meta.backbones import (
    WRN28_10,
    Conv4,
    ResNet12,
    TaskBatchNorm2d,
    TimmBackbone,
    TorchvisionBackbone,
    WideResNet,
    WrappedBackbone,
)

SIZE = 32
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def timm_backbone(**kwargs) -> nn.Module:
    pytest.importorskip("timm")
    return TimmBackbone("resnet10t", **kwargs)


def side(maml: bool) -> int:
    return 16 if maml else SIZE  # MAML's double backward is the slow part: the smallest images ResNet-12 takes


# Small versions for speed; for MAML each is built with per-task batch norm (maml=True).
BACKBONES: dict[str, Callable[[bool], nn.Module]] = {
    "conv4": lambda maml: Conv4(3, 8, side(maml), track_running_stats=not maml),
    "resnet12": lambda maml: ResNet12(3, (8, 16, 24, 32), side(maml), track_running_stats=not maml),
    "resnet12_flat": lambda maml: ResNet12(
        3, (8, 16, 24, 32), side(maml), avg_pool=False, track_running_stats=not maml
    ),
    "wrn": lambda maml: WideResNet(10, 1, 3, side(maml), track_running_stats=not maml),
    "timm": lambda maml: timm_backbone(task_batch_norm=maml),
    "torchvision": lambda maml: TorchvisionBackbone("resnet18", task_batch_norm=maml),
}
EMBEDDING = {
    "conv4": 8 * 2 * 2,
    "resnet12": 32,
    "resnet12_flat": 32 * 2 * 2,
    "wrn": 64,
    "timm": 512,
    "torchvision": 512,
}


@pytest.mark.parametrize("name", BACKBONES)
def test_output_is_n_by_embedding_dim_with_leading_dims_kept(name):
    backbone = BACKBONES[name](False).eval()
    assert backbone.embedding_dim == EMBEDDING[name]
    with torch.no_grad():
        assert backbone(torch.rand(3, 3, SIZE, SIZE)).shape == (3, EMBEDDING[name])
        assert backbone(torch.rand(2, 2, 3, SIZE, SIZE)).shape == (2, 2, EMBEDDING[name])


@pytest.mark.parametrize("name", BACKBONES)
def test_one_protonet_training_step(name):
    torch.manual_seed(0)
    model = lightning_meta.ProtoNet(backbone=BACKBONES[name](False)).train()
    loss = model.training_step(make_episodes(1, 2, 1, 2, (3, SIZE, SIZE)), 0)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", BACKBONES)
def test_one_maml_training_step_with_task_batch_norm(name):
    torch.manual_seed(0)
    backbone = BACKBONES[name](True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, TaskBatchNorm2d) for m in backbone.modules())
    net = nn.Sequential(backbone, nn.Linear(backbone.embedding_dim, 2))  # the explicit head
    # Second order through the small in-house networks; the 5M-11M parameter library ResNets go first order.
    first_order = name in ("timm", "torchvision")
    model = lightning_meta.MAML(net, inner_lr=0.01, inner_steps=1, first_order=first_order, task_batching="loop")
    loss = model.train().training_step(make_episodes(1, 2, 1, 1, (3, 16, 16)), 0)
    loss.backward()
    first_conv = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))
    assert torch.isfinite(loss) and first_conv.weight.grad is not None
    assert first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", BACKBONES)
def test_channel_mismatch_names_both_settings(name):
    backbone = BACKBONES[name](False)
    with pytest.raises(
        ValueError, match=r"the data has 1 channel\(s\) and the backbone expects in_channels=3; set --data"
    ):
        backbone(torch.rand(2, 1, SIZE, SIZE))


def test_resnet12_out_features_is_a_linear_head_for_maml():
    model = ResNet12(3, (8, 16, 24, 32), SIZE, out_features=5, track_running_stats=False)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 5 and model.embedding_dim == 32
    assert model(torch.rand(2, 3, 3, SIZE, SIZE)).shape == (2, 3, 5)


def test_dropblock_drops_squares_in_training_only():
    from lightning_meta.backbones.resnet12 import drop_block

    torch.manual_seed(0)
    x = torch.ones(64, 8, 21, 21)
    dropped = drop_block(x, 0.1, 5) == 0
    assert 0.07 < dropped.float().mean() < 0.13  # gamma of Ghiasi et al.'s eq. 1 drops about drop_rate
    model = ResNet12(3, (8, 16, 24, 32), SIZE).eval()
    with torch.no_grad():
        x = torch.rand(2, 3, SIZE, SIZE)
        assert torch.equal(model(x), model(x))


def test_parameter_counts_match_the_papers():
    # MetaOptNet/RFS ResNet-12 with 64-160-320-640 channels: 12,424,320 parameters ("12.4M"), the same
    # as learn2learn's ResNet12 feature extractor; WRN-28-10: 36.5M (Zagoruyko & Komodakis, table 1).
    resnet12 = sum(p.numel() for p in ResNet12().parameters())
    assert resnet12 == 12_424_320 and abs(resnet12 / 12.4e6 - 1) < 0.01
    assert ResNet12(avg_pool=False).embedding_dim == 640 * 5 * 5
    wrn = WRN28_10()
    assert wrn.embedding_dim == 640 and abs(sum(p.numel() for p in wrn.parameters()) / 36.5e6 - 1) < 0.01


@pytest.mark.parametrize(
    "make, owner", [(lambda s: Conv4(image_size=s), "Conv4"), (lambda s: ResNet12(image_size=s), "ResNet12")]
)
def test_too_small_images_name_the_smallest_size(make, owner):
    with pytest.raises(ValueError, match=f"image_size=8 is too small.*{owner} needs images of at least 16x16"):
        make(8)
    backbone = make(16)
    with pytest.raises(ValueError, match=f"{owner} needs images of at least 16x16 pixels; got 8x12"):
        backbone(torch.rand(2, backbone.in_channels, 8, 12))


def test_wrapper_checks_its_minimum_size():
    wrapped = WrappedBackbone(nn.Flatten(), 12, 3, min_image_size=4)
    assert wrapped(torch.rand(5, 3, 4, 4)).shape == (5, 48)
    with pytest.raises(ValueError, match="at least 4x4 pixels; got 2x2"):
        wrapped(torch.rand(5, 3, 2, 2))


def test_timm_module_imports_without_timm_and_the_wrapper_says_how_to_install(monkeypatch):
    import importlib

    import lightning_meta.backbones.timm as timm_module

    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed: `import timm` raises ImportError
    try:
        reloaded = importlib.reload(timm_module)
        with pytest.raises(ImportError, match=r'pip install "lightning-meta\[timm\]"'):
            reloaded.TimmBackbone("resnet10t")
    finally:
        monkeypatch.undo()
        importlib.reload(timm_module)
