"""Channels-last weights are the Trainer's: the ChannelsLast callback, which some modules ask for."""

import pytest
import torch

from lightning_meta import MAML, R2D2, ChannelsLast, Conv4, MatchingNet, MetaOptNet, ProtoNet


def conv_weight(module):
    # Not the first: a 1-channel [O, 1, k, k] weight is contiguous in both formats.
    return next(p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1)


def test_modules_ask_for_the_callback_and_it_converts_the_weights():
    r2d2, maml = R2D2(Conv4(hidden=8)), MAML(Conv4(hidden=8, out_features=5))
    assert [type(c) for c in r2d2.configure_callbacks()] == [ChannelsLast]
    assert maml.configure_callbacks() == []
    assert not conv_weight(r2d2).is_contiguous(memory_format=torch.channels_last)  # nothing at construction
    ChannelsLast().setup(None, r2d2, "fit")  # type: ignore[arg-type]
    assert conv_weight(r2d2).is_contiguous(memory_format=torch.channels_last)


def test_the_constructor_argument_is_deprecated_but_still_chooses():
    with pytest.warns(DeprecationWarning, match="ChannelsLast callback"):
        model = R2D2(Conv4(hidden=8), channels_last=False)
    assert model.configure_callbacks() == []
    with pytest.warns(DeprecationWarning, match="channels_last=True is deprecated"):
        maml = MAML(Conv4(hidden=8, out_features=5), channels_last=True)
    assert [type(c) for c in maml.configure_callbacks()] == [ChannelsLast]


@pytest.mark.parametrize("module", [ProtoNet, MatchingNet, MetaOptNet])
def test_metric_methods_ask_for_the_callback_by_default_and_the_argument_turns_it_off(module):
    assert [type(c) for c in module(Conv4(hidden=8)).configure_callbacks()] == [ChannelsLast]
    with pytest.warns(DeprecationWarning, match="ChannelsLast callback"):
        assert module(Conv4(hidden=8), channels_last=False).configure_callbacks() == []
