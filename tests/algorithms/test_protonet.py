import copy

import lightning.pytorch as pl
import pytest
import torch
from episode_factory import make_episodes
from torch import nn

from datamodules import EpisodeBatch, Omniglot
from lightning_meta import ChannelsLast, Conv4, ProtoNet


def random_batch(tasks=2, ways=3, shots=2, queries=4, dim=5, seed=0):
    return make_episodes(tasks, ways, shots, queries, (dim,), seed)


def test_logits_are_negative_squared_distances_to_class_means():
    batch = random_batch()
    model = ProtoNet(backbone=nn.Identity())
    logits = model.episode_logits(batch)
    prototypes = batch.support_x.view(2, 3, 2, 5).mean(2)
    expected = -torch.cdist(batch.query_x, prototypes).square()
    assert logits.shape == (2, 12, 3)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_cosine_distance():
    batch = random_batch()
    model = ProtoNet(backbone=nn.Identity(), distance="cosine", cosine_scale=3.0)
    prototypes = batch.support_x.view(2, 3, 2, 5).mean(2)
    expected = 3.0 * torch.nn.functional.cosine_similarity(batch.query_x.unsqueeze(2), prototypes.unsqueeze(1), dim=-1)
    torch.testing.assert_close(model.episode_logits(batch), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="distance='manhattan'"):
        ProtoNet(distance="manhattan")


def test_plain_tuple_gives_same_loss_as_episode_batch():
    batch = random_batch(dim=28 * 28)
    images = EpisodeBatch(
        batch.support_x.view(2, 6, 1, 28, 28),
        batch.support_y,
        batch.query_x.view(2, 12, 1, 28, 28),
        batch.query_y,
    )
    model = ProtoNet().eval()
    with torch.no_grad():
        a = model.training_step(images, 0)
        b = model.training_step(tuple(images), 0)
    torch.testing.assert_close(a, b)


def test_bf16_autocast_loss_matches_fp32():
    batch = random_batch(dim=28 * 28, ways=5, shots=1, queries=5, seed=3)
    images = EpisodeBatch(
        batch.support_x.view(2, 5, 1, 28, 28).sigmoid(),
        batch.support_y,
        batch.query_x.view(2, 25, 1, 28, 28).sigmoid(),
        batch.query_y,
    )
    torch.manual_seed(0)
    model = ProtoNet(backbone=Conv4())
    fp32, _ = model.episode_loss(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _ = model.episode_loss(images)
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)


def test_validate_then_fit_with_default_trainer(fake_omniglot):
    """trainer.validate runs under inference mode, fit's validation does not: metrics must survive both."""
    dm = Omniglot(
        root=str(fake_omniglot), ways=2, shots=1, queries=2, rotations=False, train_episodes=4, val_episodes=4
    )
    model = ProtoNet()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    before = trainer.validate(model, dm, verbose=False)[0]["val/acc"]
    trainer.fit(model, dm)
    assert 0 <= before <= 1 and 0 <= trainer.callback_metrics["val/acc"] <= 1


def test_channels_last_callback_converts_the_backbone_and_keeps_the_loss():
    torch.manual_seed(0)
    batch = make_episodes(2, 5, 1, 3, (1, 28, 28), 0)
    fast = ProtoNet(Conv4(1, 8, 28))  # asks for channels-last by default
    plain = copy.deepcopy(fast)
    assert [type(c) for c in fast.configure_callbacks()] == [ChannelsLast]
    ChannelsLast.convert(fast)  # what the callback does when the Trainer sets up
    assert not plain.backbone.features[4].weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.backbone.features[4].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast.episode_loss(batch)[0], plain.episode_loss(batch)[0], rtol=1e-4, atol=1e-5)
