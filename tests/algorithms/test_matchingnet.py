import pytest
import torch
from episode_factory import make_episodes
from torch import nn

from datamodules import EpisodeBatch
from lightning_meta import Conv4, MatchingNet


def random_batch(tasks=2, ways=3, shots=2, queries=4, dim=6, seed=0):
    return make_episodes(tasks, ways, shots, queries, (dim,), seed)


@pytest.mark.parametrize("fce", [False, True])
def test_attention_sums_to_one_and_prediction_is_the_weighted_label_mix(fce):
    torch.manual_seed(0)
    model = MatchingNet(backbone=nn.Linear(6, 8), fce=fce, embedding_dim=8)
    batch = random_batch()
    attention = model.attention(batch)
    assert attention.shape == (2, 12, 6)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 12))
    expected = attention @ torch.nn.functional.one_hot(batch.support_y, 3).float()
    torch.testing.assert_close(model.episode_logits(batch).exp(), expected, rtol=1e-5, atol=1e-6)


def test_attention_is_softmax_of_cosine_similarity():
    model = MatchingNet(backbone=nn.Identity(), normalize_queries=True)
    batch = random_batch()
    cosine = torch.nn.functional.cosine_similarity(batch.query_x.unsqueeze(2), batch.support_x.unsqueeze(1), dim=-1)
    torch.testing.assert_close(model.attention(batch), cosine.softmax(-1), rtol=1e-5, atol=1e-6)


def test_by_default_the_query_norm_scales_the_cosine():
    model = MatchingNet(backbone=nn.Identity())
    batch = random_batch()
    cosine = torch.nn.functional.cosine_similarity(batch.query_x.unsqueeze(2), batch.support_x.unsqueeze(1), dim=-1)
    scaled = cosine * batch.query_x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(model.attention(batch), scaled.softmax(-1), rtol=1e-5, atol=1e-6)
    twice = model.attention(batch._replace(query_x=2 * batch.query_x))
    assert (twice.amax(-1) > model.attention(batch).amax(-1)).all()  # a longer query attends more sharply


def test_permuting_the_support_set_does_not_change_predictions_without_fce():
    torch.manual_seed(0)
    model = MatchingNet(backbone=Conv4())
    g = torch.Generator().manual_seed(0)
    batch = EpisodeBatch(
        torch.rand(1, 10, 1, 28, 28, generator=g),
        torch.arange(5).repeat_interleave(2).unsqueeze(0),
        torch.rand(1, 15, 1, 28, 28, generator=g),
        torch.arange(5).repeat_interleave(3).unsqueeze(0),
    )
    perm = torch.randperm(10, generator=g)
    permuted = batch._replace(support_x=batch.support_x[:, perm], support_y=batch.support_y[:, perm])
    with torch.no_grad():
        torch.testing.assert_close(model.episode_logits(batch), model.episode_logits(permuted), rtol=1e-4, atol=1e-5)


def test_fce_needs_the_embedding_size():
    with pytest.raises(ValueError, match="embedding_dim"):
        MatchingNet(backbone=nn.Identity(), fce=True)
