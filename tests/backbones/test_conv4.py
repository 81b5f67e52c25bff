import pytest
import torch

from lightning_meta import MLP, Conv4


@pytest.mark.parametrize(
    "kwargs, shape, features",
    [
        ({}, (1, 28, 28), 64),
        ({"in_channels": 3, "hidden": 32, "image_size": 84}, (3, 84, 84), 32 * 5 * 5),
        ({"pooling": "stride"}, (1, 28, 28), 64),
        ({"pooling": "stride", "out_features": 5}, (1, 28, 28), 5),
    ],
)
def test_conv4_shapes_keep_leading_dimensions(kwargs, shape, features):
    model = Conv4(**kwargs)
    assert model(torch.rand(2, 3, *shape)).shape == (2, 3, features)
    assert model(torch.rand(4, *shape)).shape == (4, features)


def test_conv4_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pooling='avg'"):
        Conv4(pooling="avg")
    with pytest.raises(ValueError, match="image_size=8 is too small"):
        Conv4(image_size=8)


def test_mlp_default_is_the_maml_sinusoid_network():
    model = MLP()
    assert [p.shape for p in model.parameters()] == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    assert model(torch.rand(7, 1)).shape == (7, 1)


def _old_block_order(model: Conv4) -> torch.nn.Sequential:
    """The textbook order conv, BN, ReLU, pool, built from ``model``'s own layers."""
    layers = list(model.features)
    blocks = [layers[i : i + 4] for i in range(0, len(layers), 4)]
    return torch.nn.Sequential(*(m for conv, bn, pool, relu in blocks for m in (conv, bn, relu, pool)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv4_pooling_before_relu_matches_the_textbook_order(dtype):
    torch.manual_seed(0)
    model = Conv4(1, 8, 28).to(dtype)
    old = _old_block_order(model)
    assert [type(m).__name__ for m in old[:4]] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    # Coarse values make ties in the pooling windows, where only the first maximum may get the gradient.
    x = (torch.randn(6, 1, 28, 28) * 2).round().to(dtype).requires_grad_()
    y_new, y_old = model.features(x), old(x)
    assert torch.equal(y_new, y_old)
    g = torch.randn_like(y_new)
    (grad_new,) = torch.autograd.grad(y_new, x, g)
    (grad_old,) = torch.autograd.grad(old(x), x, g)
    assert grad_new.abs().sum() > 0
    assert torch.equal(grad_new, grad_old)
    # Convolutions and batch norms keep their positions (4b and 4b + 1), so older checkpoints still load.
    layers_with_state = {key.rsplit(".", 1)[0] for key in model.state_dict()}
    assert layers_with_state == {f"features.{4 * b + j}" for b in range(4) for j in (0, 1)}
