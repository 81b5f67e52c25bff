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
