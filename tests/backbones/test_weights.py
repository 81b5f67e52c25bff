"""Pretrained weights from local files, freezing and the per-task batch-norm conversion."""

import pytest
import torch
import torchvision
from torch import nn

from lightning_meta.backbones import TaskBatchNorm2d, TimmBackbone, TorchvisionBackbone, task_batch_norm


def reference(kind: str, name: str) -> nn.Module:
    """The library's own model, classifier included, as a user would save it."""
    if kind == "timm":
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False)
    return torchvision.models.get_model(name, weights=None)


def wrapper(kind: str):
    if kind == "timm":
        pytest.importorskip("timm")
        return TimmBackbone
    return TorchvisionBackbone


KINDS = {"timm": "resnet10t", "torchvision": "resnet18"}


def randomise_norms(model: nn.Module) -> None:
    """Non-default batch-norm weights and statistics, so that loading them is visible."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.data.copy_(torch.rand(t.shape, generator=g))
            m.running_var.data.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_from_a_local_state_dict_ignores_the_classifier(kind, suffix, tmp_path):
    name = KINDS[kind]
    source = reference(kind, name)
    randomise_norms(source)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file = pytest.importorskip("safetensors.torch").save_file
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    loaded = wrapper(kind)(name, pretrained=str(path)).model.state_dict()
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert set(loaded) == set(expected) and any(k.startswith("fc.") for k in source.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_pretrained_true_reads_the_cache_and_a_missing_file_names_the_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloaded") as err:
        TorchvisionBackbone("resnet18", pretrained=True)
    assert str(tmp_path / "resnet18.pth") in str(err.value) and "LIGHTNING_META_CACHE" in str(err.value)
    source = reference("torchvision", "resnet18")
    randomise_norms(source)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = TorchvisionBackbone("resnet18", pretrained=True)
    assert torch.equal(model.model.bn1.running_mean, source.bn1.running_mean)
    missing = tmp_path / "elsewhere" / "r18.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        TorchvisionBackbone("resnet18", pretrained=str(missing))


def test_weights_of_another_architecture_are_a_clear_error(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(reference("torchvision", "resnet34").state_dict(), path)
    with pytest.raises(ValueError, match=r"do not fit 'resnet18'.*unexpected \(\d+\): layer1.2"):
        TorchvisionBackbone("resnet18", pretrained=str(path))


def test_one_channel_backbone_sums_the_pretrained_rgb_filters(tmp_path):
    source = reference("torchvision", "resnet18")
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = TorchvisionBackbone("resnet18", pretrained=str(tmp_path / "w.pth"), in_channels=1)
    torch.testing.assert_close(model.model.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 512)


def frozen_step(model: nn.Module) -> tuple[dict, dict]:
    """State before and after one SGD step on all parameters (frozen ones have no gradient)."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    loss = model(torch.rand(4, 3, 32, 32)).square().mean()
    if loss.requires_grad:  # not when everything is frozen
        loss.backward()
    optimizer.step()
    return before, model.state_dict()


@pytest.mark.parametrize("kind", KINDS)
def test_freeze_k_trains_only_the_last_k_blocks_and_keeps_frozen_statistics(kind):
    torch.manual_seed(0)
    model = wrapper(kind)(KINDS[kind], freeze=1)
    before, after = frozen_step(model)
    assert model.training and not model.model.layer3[0].bn1.training and model.model.layer4[0].bn1.training
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layer4.") for k in changed)
    # Every weight of the trainable block moves (weight decay at least) and so do its batch-norm statistics.
    layer4 = [k for k in before if k.startswith("model.layer4.") and k.endswith(("conv1.weight", "running_mean"))]
    assert layer4 and set(layer4) <= changed
    assert all(p.requires_grad == n.startswith("model.layer4.") for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="between 0 and 4"):
        wrapper(kind)(KINDS[kind], freeze=5)


def test_freeze_true_keeps_everything_bit_identical():
    model = TorchvisionBackbone("resnet18", freeze=True)
    before, after = frozen_step(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "make", [lambda: torchvision.models.resnet18(), lambda: reference("timm", "mobilenetv3_small_050")]
)
def test_task_batch_norm_replaces_every_batch_norm_and_keeps_train_mode_outputs(make):
    torch.manual_seed(0)
    model = make().train()
    randomise_norms(model)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        converted = task_batch_norm(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
        assert sum(isinstance(m, TaskBatchNorm2d) for m in converted.modules()) == norms
        # Batch norm in training mode normalises with the batch's statistics, as the task norm always does.
        torch.testing.assert_close(converted(x), expected)
