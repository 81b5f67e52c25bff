import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from episode_factory import make_episodes
from torch import nn

from datamodules import EpisodeBatch, Omniglot
from lightning_meta import Conv4, MetaNetwork
from lightning_meta.algorithms.metanetwork import layer_augmented, log_and_sign, read_memory


def tiny_model(**kwargs) -> MetaNetwork:
    torch.manual_seed(0)
    return MetaNetwork(ways=3, backbone=nn.Linear(6, 8), embedding_dim=8, hidden=5, **kwargs)


def tiny_batch(shots=1, queries=2, seed=0) -> EpisodeBatch:
    return make_episodes(2, 3, shots, queries, (6,), seed)


def test_memory_read_is_a_softmax_of_cosines_that_returns_the_most_similar_keys_value():
    keys = torch.eye(4).unsqueeze(0)  # [1, 4 slots, 4]
    values = torch.randn(1, 4, 7, generator=torch.Generator().manual_seed(0))
    queries = torch.stack([3 * keys[0, 2], keys[0, 0] + 0.5 * keys[0, 1]]).unsqueeze(0)  # norm does not matter
    weights, read = read_memory(keys, values, queries)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2))
    cosine = F.cosine_similarity(queries.unsqueeze(2), keys.unsqueeze(1), dim=-1)
    torch.testing.assert_close(weights, cosine.softmax(-1))
    torch.testing.assert_close(read, weights @ values)
    sharp, read_sharp = read_memory(keys, values, queries, scale=50.0)
    assert sharp.argmax(-1).tolist() == [[2, 0]]
    torch.testing.assert_close(read_sharp[0, 0], values[0, 2], rtol=0, atol=1e-6)


def test_layer_augmentation_adds_the_slow_and_fast_outputs_after_the_nonlinearity():
    h = torch.tensor([[1.0, -2.0]])
    slow = torch.tensor([[1.0, 1.0], [2.0, 0.0]])  # h W^T = [-1, 2]
    fast = torch.tensor([[[0.0, -1.0], [1.0, 1.0]]])  # h W*^T = [2, -1]
    torch.testing.assert_close(layer_augmented(h, slow, fast, activation=True), torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(layer_augmented(h, slow, fast, activation=False), torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(layer_augmented(h, slow, None, activation=True), torch.tensor([[0.0, 2.0]]))
    torch.testing.assert_close(layer_augmented(h, slow, torch.zeros_like(fast), True), torch.tensor([[0.0, 2.0]]))


def test_log_and_sign_preprocessing():
    g = torch.tensor([1.0, -1e-2, 0.0, 1e-4])  # e^-7 = 9.1e-4 separates the two regimes
    out = log_and_sign(g, k=7.0)
    expected = torch.tensor([[0.0, 1.0], [-4.60517 / 7, -1.0], [-1.0, 0.0], [-1.0, 1e-4 * 1096.6332]])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)


def test_the_fast_weights_change_the_prediction_and_zero_fast_weights_give_the_slow_network():
    model = tiny_model()
    batch = tiny_batch()
    state = model.memory(batch)
    features = state["features"]
    fast = model.base_forward(features, model.unflatten(state["read"]))
    zero = model.base_forward(features, model.unflatten(torch.zeros_like(state["read"])))
    slow = model.base_out(F.relu(model.base_hidden(features)))
    torch.testing.assert_close(zero, slow)
    assert (fast - slow).abs().max() > 1e-3
    torch.testing.assert_close(model.episode_logits(batch), fast)


def test_each_support_examples_fast_weights_are_generated_from_its_own_loss_gradient():
    model = tiny_model()
    batch = tiny_batch()
    values = model.memory(batch)["values"]  # [B, N, P]
    # By hand for task 0, example 0: W*_0 = m(Z, log_and_sign(grad_W loss_task(b(W, x'_0), y'_0))) (eq. 1, 10-11).
    h = model.backbone(batch.support_x[0, :1])
    loss = F.cross_entropy(model.base_out(F.relu(model.base_hidden(h))), batch.support_y[0, :1])
    grads = torch.autograd.grad(loss, [model.base_hidden.weight, model.base_out.weight])
    expected = torch.cat([model.m(log_and_sign(g)).squeeze(-1).flatten() for g in grads])
    torch.testing.assert_close(values[0, 0], expected, rtol=1e-4, atol=1e-6)
    # Another label for support example 0 changes its fast weights and no other example's.
    labels = batch.support_y.clone()
    labels[:, 0] = (labels[:, 0] + 1) % 3
    changed = model.memory(batch._replace(support_y=labels))["values"]
    assert (changed[:, 0] - values[:, 0]).abs().amax(-1).min() > 1e-4
    torch.testing.assert_close(changed[:, 1:], values[:, 1:])


def test_a_query_identical_to_a_support_example_reads_almost_only_its_fast_weights():
    model = tiny_model(attention_scale=30.0)
    batch = tiny_batch()
    batch = batch._replace(query_x=batch.support_x, query_y=batch.support_y)
    attention = model.memory(batch)["attention"]  # [B, Q, N]
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 3))
    assert torch.equal(attention.argmax(-1), torch.arange(3).expand(2, 3))
    assert attention.diagonal(dim1=1, dim2=2).min() > 0.95


def test_permuting_the_support_set_does_not_change_predictions():
    torch.manual_seed(0)
    model = MetaNetwork(ways=5, backbone=Conv4(hidden=8)).eval()
    batch = make_episodes(1, 5, 2, 3, (1, 28, 28), draw=torch.rand)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    permuted = batch._replace(support_x=batch.support_x[:, perm], support_y=batch.support_y[:, perm])
    with torch.no_grad():
        torch.testing.assert_close(model.episode_logits(batch), model.episode_logits(permuted), rtol=1e-4, atol=1e-5)


def test_contrastive_representation_loss_of_eq_6_7_by_hand():
    model = tiny_model(embedding_loss="contrastive", contrastive_margin=1.5)
    batch = tiny_batch(shots=2)
    h = model.representation(batch.support_x)
    losses, _ = model._step_losses(h, batch.support_y)  # [B, T]: pairs that start at class t
    r = model.key(h)
    for b in range(2):
        for t in range(3):
            terms = []
            for i in range(6):
                for j in range(6):
                    if i == j or batch.support_y[b, i] != t:
                        continue
                    d = (r[b, i] - r[b, j]).norm()
                    same = bool(batch.support_y[b, i] == batch.support_y[b, j])
                    terms.append(d**2 if same else (1.5 - d).clamp_min(0) ** 2)
            torch.testing.assert_close(losses[b, t], torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["cross_entropy", "contrastive"])
def test_training_loss_adds_the_representation_loss_and_every_parameter_learns(loss):
    model = tiny_model(embedding_loss=loss)
    batch = tiny_batch(shots=2)
    query_only = MetaNetwork.query_loss(model.episode_logits(batch), batch.query_y)
    out = model.episode_loss(batch)
    torch.testing.assert_close(out.loss, query_only + model.memory(batch)["embedding_loss"])
    out.loss.sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    model.eval()
    torch.testing.assert_close(model.episode_loss(batch).loss, query_only)  # evaluation reports the query loss


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    model = tiny_model()
    batch = tiny_batch()
    fp32 = model.episode_loss(batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.episode_loss(batch).loss
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ways": 0}, "ways=0"),
        ({"ways": 3, "hidden": 0}, "hidden=0"),
        ({"ways": 3, "meta_hidden": -2}, "meta_hidden=-2"),
        ({"ways": 3, "embedding_loss": "triplet"}, "embedding_loss='triplet'"),
        ({"ways": 3, "attention_scale": -1.0}, "attention_scale=-1.0"),
        ({"ways": 3, "embedding_loss_weight": float("nan")}, "embedding_loss_weight=nan"),
        ({"ways": 3, "backbone": nn.Identity()}, "embedding_dim"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetaNetwork(**kwargs)


def test_episodes_of_other_ways_name_the_fix():
    model = tiny_model()
    with pytest.raises(ValueError, match="ways=3 but these episodes are 4-way"):
        model.episode_logits(make_episodes(1, 4, 1, 2, (6,)))
    with pytest.raises(ValueError, match="embedding_loss='contrastive' needs two or more shots"):
        tiny_model(embedding_loss="contrastive").episode_logits(tiny_batch(shots=1))
    regression = tiny_batch()._replace(support_y=torch.zeros(2, 3, 1), query_y=torch.zeros(2, 6, 1))
    with pytest.raises(ValueError, match="support_y"):
        model.episode_logits(regression)


def test_fit_checks_ways_against_the_episodes(fake_omniglot):
    model = MetaNetwork(ways=3, backbone=Conv4(hidden=8))
    dm = Omniglot(root=str(fake_omniglot), ways=2, shots=1, queries=2, rotations=False, val_episodes=2)
    trainer = pl.Trainer(fast_dev_run=1, logger=False, enable_progress_bar=False, inference_mode=False)
    with pytest.raises(ValueError, match="ways=3 but these episodes are 2-way"):
        trainer.fit(model, dm)
