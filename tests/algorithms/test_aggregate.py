import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from episode_factory import make_episodes
from test_cli import scalars
from torch import Tensor, nn

from datamodules import EpisodeBatch, Omniglot
from lightning_meta import MAML, Aggregate, Conv4, MatchingNet, ProtoNet
from lightning_meta.algorithms.aggregate import leave_one_out
from lightning_meta.cli import main

REPO = Path(__file__).resolve().parents[2]


def image_batch(tasks=2, ways=5, shots=1, queries=3, seed=0) -> EpisodeBatch:
    return make_episodes(tasks, ways, shots, queries, (1, 28, 28), seed, draw=torch.rand)


def small_maml(ways=5, **kwargs) -> MAML:
    backbone = Conv4(hidden=8, pooling="stride", out_features=ways, track_running_stats=False)
    return MAML(backbone, task_batching="loop", **kwargs)


def omniglot(cache: dict, **kwargs) -> Omniglot:
    settings = {"ways": 5, "shots": 1, "queries": 5, "val_episodes": 20, "test_episodes": 20, **kwargs}
    return Omniglot(root=cache["root"], cache_dir=cache["cache_dir"], **settings)


def trainer(**kwargs) -> pl.Trainer:
    settings = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "inference_mode": False, "accelerator": "cpu", **kwargs}  # fmt: skip
    return pl.Trainer(**settings)


# ---------------------------------------------------------------------- combining
@pytest.mark.parametrize("weighting", ["global", "episode"])
def test_one_member_reproduces_its_predictions_exactly(weighting):
    torch.manual_seed(0)
    batch = image_batch()
    member = ProtoNet(Conv4(hidden=8)).eval()
    with torch.no_grad():
        expected = member.episode_outputs(batch)
        aggregate = Aggregate(members=[member], weighting=weighting).eval()
        got = aggregate.episode_outputs(batch)
    assert torch.equal(got.predictions, expected.predictions.log_softmax(-1))
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-6, atol=1e-6)


def test_a_frozen_maml_member_still_adapts_like_maml():
    """Frozen parameters do not require grad, which the inner loop would skip: the aggregate thaws them to adapt."""
    torch.manual_seed(0)
    batch = image_batch()
    member = small_maml(inner_steps_eval=3).eval()
    expected = member.episode_outputs(batch).predictions.detach()
    unadapted = member.backbone(batch.query_x.flatten(0, 1)).view_as(expected)
    aggregate = Aggregate(members=[member]).eval()
    assert aggregate.needs_grad_in_eval
    with torch.no_grad():  # as Lightning validates
        got = aggregate.episode_logits(batch)
    torch.testing.assert_close(got, expected.log_softmax(-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unadapted.log_softmax(-1), atol=1e-3), "the member did not adapt"
    assert not any(p.requires_grad for p in member.parameters())


def test_one_hot_weights_give_the_chosen_member():
    torch.manual_seed(0)
    batch = image_batch()
    members = [ProtoNet(Conv4(hidden=8)), MatchingNet(Conv4(hidden=8))]
    aggregate = Aggregate(members=members).eval()
    for chosen in (0, 1):
        with torch.no_grad():
            aggregate.weight_logits.copy_(torch.tensor([0.0, -torch.inf] if chosen == 0 else [-torch.inf, 0.0]))
            got = aggregate.episode_logits(batch)
            expected = members[chosen].episode_logits(batch).log_softmax(-1)
        assert torch.equal(got, expected)


def test_global_weights_are_a_softmax_and_only_they_learn():
    torch.manual_seed(0)
    members = [ProtoNet(Conv4(hidden=8)), ProtoNet(Conv4(hidden=8)), MatchingNet(Conv4(hidden=8))]
    aggregate = Aggregate(members=members).train()
    assert all(not m.training for m in aggregate.members), "frozen members stay in eval mode"
    assert not any(p.requires_grad for p in aggregate.members.parameters())
    with torch.no_grad():
        aggregate.weight_logits.copy_(torch.tensor([1.0, -0.5, 0.3]))
    weights = aggregate.episode_weights()
    torch.testing.assert_close(weights, aggregate.weight_logits.detach().softmax(-1).unsqueeze(0))
    torch.testing.assert_close(weights.sum(-1), torch.ones(1))
    aggregate.episode_loss(image_batch()).loss.mean().backward()
    assert aggregate.weight_logits.grad is not None and aggregate.weight_logits.grad.abs().sum() > 0
    optimizer = aggregate.configure_optimizers()
    assert [len(g["params"]) for g in optimizer.param_groups] == [1]


def test_train_members_trains_them_jointly_with_their_own_learning_rate():
    members = [ProtoNet(Conv4(hidden=8)), small_maml()]
    aggregate = Aggregate(members=members, train_members=True, member_lr=1e-4).train()
    assert all(m.training for m in aggregate.members)
    optimizer = aggregate.configure_optimizers()
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-4]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(aggregate.parameters()))
    loss = aggregate.training_step(image_batch(), 0)
    loss.backward()
    assert all(p.grad is not None for m in members for p in m.parameters())


# ---------------------------------------------------------------------- per-episode weights
def test_leave_one_out_episodes_hold_out_each_support_item():
    batch = make_episodes(2, 3, 2, 1, (4,), 0)
    out = leave_one_out(batch)
    assert out.support_x.shape == (12, 5, 4) and out.query_x.shape == (12, 1, 4)
    for task in range(2):
        for j in range(6):
            k = task * 6 + j
            assert torch.equal(out.query_x[k, 0], batch.support_x[task, j])
            kept = [i for i in range(6) if i != j]
            assert torch.equal(out.support_x[k], batch.support_x[task, kept])
            assert torch.equal(out.support_y[k], batch.support_y[task, kept])


def test_episode_weights_follow_the_statistics():
    torch.manual_seed(0)
    aggregate = Aggregate(members=[ProtoNet(Conv4(hidden=8)), ProtoNet(Conv4(hidden=8))], weighting="episode")
    same = torch.tensor([[[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]])
    torch.testing.assert_close(aggregate.episode_weights(same), torch.full((1, 2), 0.5))  # starts uniform
    nn.init.normal_(aggregate.scorer[-1].weight)
    torch.testing.assert_close(aggregate.episode_weights(same), torch.full((1, 2), 0.5))
    differ = torch.tensor([[[0.1, 0.2, 0.3], [2.0, 0.9, 0.8]]])
    weights = aggregate.episode_weights(torch.cat([same, differ]))
    assert weights.shape == (2, 2) and not torch.allclose(weights[1], weights[0])
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))


class Noisy(ProtoNet):
    """ProtoNet's logits plus fixed noise: wrong on some queries of every episode."""

    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        logits = super().episode_logits(batch)
        noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(logits.numel()))
        return logits + 8 * noise


class Flaky(ProtoNet):
    """ProtoNet (nearly always right) on half the episodes; on the others (first support feature < 0) one class off."""

    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        logits = super().episode_logits(batch)
        bad = (batch.support_x[:, 0, 0] < 0).view(-1, 1, 1)
        return torch.where(bad, logits.roll(1, dims=-1), logits)


def clustered(tasks: int, seed: int) -> EpisodeBatch:
    """5-way 1-shot episodes of 8-d points around class centres: ProtoNet on raw points is nearly always right."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(tasks, 5, 1, 8, generator=g)
    support = (centres + 0.3 * torch.randn(tasks, 5, 1, 8, generator=g)).flatten(1, 2)
    query = (centres + 0.3 * torch.randn(tasks, 5, 4, 8, generator=g)).flatten(1, 2)
    labels = torch.arange(5)
    return EpisodeBatch(support, labels.expand(tasks, -1), query, labels.repeat_interleave(4).expand(tasks, -1))


def test_episode_weighting_learns_to_trust_a_member_where_it_does_well():
    """Flaky is better than Noisy where it is right and far worse where it is not; its support loss tells which.

    One global weight must compromise; per-episode weights learn to follow the episode.
    """
    torch.manual_seed(0)
    losses, models = {}, {}
    for weighting in ("global", "episode"):
        model = Aggregate(members=[Noisy(nn.Identity()), Flaky(nn.Identity())], weighting=weighting)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for step in range(100):
            loss = model.episode_loss(clustered(16, step)).loss.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            test = clustered(200, 10_000)
            losses[weighting] = model.eval().episode_loss(test).loss.mean().item()
            models[weighting] = model
    bad = test.support_x[:, 0, 0] < 0
    with torch.no_grad():
        weights = models["episode"].combine(test).weights[:, 1]
    assert weights[~bad].mean() > 0.7 and weights[bad].mean() < 0.3, (weights[~bad].mean(), weights[bad].mean())
    assert losses["episode"] < 0.8 * losses["global"], losses  # 1.19 against 1.87 when written


# ---------------------------------------------------------------------- real Omniglot, Trainer, checkpoints
@pytest.mark.slow
def test_global_weights_prefer_a_trained_member_and_members_stay_frozen(omniglot_cache, tmp_path):
    torch.manual_seed(0)
    good, untrained = ProtoNet(Conv4(hidden=16)), ProtoNet(Conv4(hidden=16))
    pretrain = trainer(max_epochs=1, default_root_dir=tmp_path, limit_val_batches=0)
    pretrain.fit(good, omniglot(omniglot_cache, train_episodes=150))
    before = [copy.deepcopy(m.state_dict()) for m in (untrained, good)]
    aggregate = Aggregate(members=[untrained, good], optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    data = omniglot(omniglot_cache, train_episodes=30, seed=1)
    fit = trainer(max_epochs=1, default_root_dir=tmp_path, limit_val_batches=0)
    fit.fit(aggregate, data)
    weights = aggregate.episode_weights()[0]
    assert weights[1] > 0.75, weights  # from 0.5; 0.86 when written (test acc 0.68 against 0.43)
    for member, state in zip((untrained, good), before, strict=True):
        assert member.state_dict().keys() == state.keys()
        assert all(torch.equal(member.state_dict()[k], v) for k, v in state.items()), "a frozen member changed"
    metrics = fit.test(aggregate, data, verbose=False)[0]
    assert metrics["test/acc_member_1_protonet"] > metrics["test/acc_member_0_protonet"] + 0.1
    assert metrics["test/weight_1"] == pytest.approx(weights[1].item(), abs=1e-6)
    assert metrics["test/acc"] >= metrics["test/acc_member_1_protonet"] - 0.05


def test_members_from_checkpoints_predict_like_the_originals(fake_omniglot, tmp_path):
    torch.manual_seed(0)
    original = ProtoNet()
    data = Omniglot(root=str(fake_omniglot), rotations=False, ways=2, queries=3, val_episodes=2)
    fit = trainer(max_steps=2, default_root_dir=tmp_path, limit_val_batches=0)
    fit.fit(original, data)
    path = tmp_path / "protonet.ckpt"
    fit.save_checkpoint(path)
    aggregate = Aggregate(checkpoints=[str(path)]).eval()
    assert aggregate.hparams["checkpoints"] == [str(path)]
    batch = image_batch(ways=2)
    with torch.no_grad():
        expected = original.eval().episode_logits(batch).log_softmax(-1)
        torch.testing.assert_close(aggregate.episode_logits(batch), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        Aggregate(checkpoints=[str(tmp_path / "missing.ckpt")])


def test_mixed_algorithms_run_under_a_trainer_and_a_wrong_head_is_named(fake_omniglot, tmp_path):
    torch.manual_seed(0)
    data = Omniglot(root=str(fake_omniglot), rotations=False, ways=2, queries=3, val_episodes=2, test_episodes=2)
    aggregate = Aggregate(members=[ProtoNet(Conv4(hidden=8)), small_maml(ways=2)], weighting="episode")
    fit = trainer(max_steps=2, default_root_dir=tmp_path)
    fit.fit(aggregate, data)
    metrics = fit.test(aggregate, data, verbose=False)[0]
    assert {"test/acc", "test/acc_member_0_protonet", "test/acc_member_1_maml", "test/weight_1"} <= set(metrics)
    wrong = Aggregate(members=[ProtoNet(Conv4(hidden=8)), small_maml(ways=5)])
    message = r"Aggregate member 1 \(MAML\) has a head of 5 outputs but these episodes are 2-way"
    with pytest.raises(ValueError, match=message):
        trainer(fast_dev_run=1).fit(wrong, data)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="at least one member"):
        Aggregate()
    with pytest.raises(ValueError, match="weighting='mean'"):
        Aggregate(members=[ProtoNet()], weighting="mean")
    with pytest.raises(ValueError, match=r"members\[0\] is a Conv4, not an EpisodicModule"):
        Aggregate(members=[Conv4()])


def test_cli_fit_then_test_with_checkpoint_entries(omniglot_cache, tmp_path, monkeypatch):
    """Members trained by the CLI (ProtoNet and MAML), then an aggregate of their checkpoints: fit, then test best."""
    monkeypatch.chdir(tmp_path)
    data = ["--data.root", omniglot_cache["root"], "--data.cache_dir", omniglot_cache["cache_dir"]]
    data += ["--data.val_episodes", "4", "--data.test_episodes", "6", "--data.tasks_per_batch", "2"]
    quick = [
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.enable_progress_bar",
        "false",
    ]
    checkpoints = []
    for config, extra in (("protonet/omniglot_5w1s.yaml", ["--data.train_ways", "5"]),
                          ("maml/omniglot_5w1s.yaml", ["--model.task_batching", "loop"])):  # fmt: skip
        main(["fit", "--config", str(REPO / "configs" / config), *data, *quick, *extra])
        name = config.replace("/", "_").removesuffix(".yaml")
        checkpoints.append(str(tmp_path / "lightning_logs" / name / "version_0" / "checkpoints" / "last.ckpt"))
    config = yaml.safe_load((REPO / "configs" / "aggregate" / "omniglot_5w1s.yaml").read_text())
    config["model"]["init_args"].update(members=None, checkpoints=checkpoints, train_members=False)
    config["data"]["init_args"]["train_episodes"] = 4
    path = tmp_path / "aggregate.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), *data, *quick])
    main(["test", "--config", str(path), *data, "--ckpt_path", "best", "--trainer.enable_progress_bar", "false"])
    tags = scalars(tmp_path / "lightning_logs" / "aggregate_omniglot_5w1s" / "version_1")
    assert {"test/acc", "test/acc_member_0_protonet", "test/acc_member_1_maml", "test/weight_0"} <= set(tags)
    assert sum(tags[f"test/weight_{i}"][0] for i in range(2)) == pytest.approx(1.0, abs=1e-5)
