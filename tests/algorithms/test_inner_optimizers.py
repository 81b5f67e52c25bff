"""Inner optimisers by class_path from the CLI, in MAML and Reptile; persistent Adam; old Meta-SGD checkpoints."""

import json

import pytest
import torch
from episode_factory import make_episodes

from datamodules import EpisodeBatch, Sinusoid
from lightning_meta import MAML, MLP, Conv4, Reptile
from lightning_meta.cli import make_cli
from lightning_meta.functional import SGD, Adam, MetaSGD, Momentum

OPTIMIZERS = {
    "SGD": {"lr": 0.05},
    "MetaSGD": {"lr": 0.05, "per": "element"},
    "Momentum": {"lr": 0.05, "momentum": 0.5},
    "Adam": {"lr": 0.01, "betas": [0.9, 0.999]},
}


def sine_batch(tasks=3):
    dm = Sinusoid(tasks_per_batch=tasks, seed=0)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def cli_model(algorithm, *args):
    common = ["--model.backbone", "lightning_meta.MLP", "--data", "Sinusoid", "--data.tasks_per_batch", "2"]
    return make_cli(["--model", algorithm, *common, *args, "--trainer.logger", "false"], run=False).model


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_maml_takes_each_inner_optimizer_by_class_path_and_meta_learns_through_it(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = json.dumps({"class_path": f"lightning_meta.functional.{name}", "init_args": OPTIMIZERS[name]})
    model = cli_model("MAML", "--model.inner_optimizer", config, "--model.task_batching", "loop")
    rule = model.inner_optimizer
    assert type(rule).__name__ == name and rule.lr == OPTIMIZERS[name]["lr"]
    assert model.hparams["inner_optimizer"]["class_path"].endswith(name)
    model.train()
    batch = sine_batch()
    loss = model.episode_loss(batch).loss.mean()
    loss.backward()
    body = model.backbone.net[0].weight.grad
    assert body is not None and torch.isfinite(body).all() and body.abs().sum() > 0
    if name == "MetaSGD":  # learned step sizes are the module's parameters, optimised and saved with it
        assert rule.lrs["net/0/weight"].shape == (40, 1) and rule.lrs["net/0/weight"].grad.abs().sum() > 0
        assert "inner_optimizer.lrs.net/0/weight" in model.state_dict()
    # The configured rule is the one that runs: its adapted weights differ from plain SGD's.
    x, y = batch.support_x[0], batch.support_y[0]
    sgd = MAML(model.backbone, inner_lr=OPTIMIZERS[name]["lr"])
    same = torch.allclose(
        model.adapt(x, y, steps=2).params["net.0.weight"], sgd.adapt(x, y, steps=2).params["net.0.weight"]
    )
    assert same == (name in ("SGD", "MetaSGD"))  # Meta-SGD starts at lr everywhere


def test_short_forms_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = cli_model("MAML", "--model.inner_optimizer", "Momentum", "--model.inner_optimizer.momentum", "0.3")
    assert isinstance(model.inner_optimizer, Momentum) and model.inner_optimizer.momentum == 0.3
    reptile = cli_model("Reptile", "--model.inner_optimizer", "lightning_meta.functional.Adam",
                        "--model.inner_optimizer.persistent", "true")  # fmt: skip
    assert isinstance(reptile.inner_optimizer, Adam) and reptile.inner_optimizer.persistent
    for value, expected in (("adam", Adam), ("sgd", SGD)):  # the existing configs' strings
        assert type(cli_model("Reptile", "--model.inner_optimizer", value).inner_optimizer) is expected


def test_maml_keeps_its_old_arguments():
    assert isinstance(MAML(MLP(), inner_lr=0.2).inner_optimizer, SGD)
    for learn, shape in ((True, ()), ("tensor", ()), ("element", (40, 1))):
        rule = MAML(MLP(), inner_lr=0.2, learn_inner_lr=learn).inner_optimizer
        assert isinstance(rule, MetaSGD) and rule.lrs["net/0/weight"].shape == shape
    with pytest.raises(ValueError, match="give one"):
        MAML(MLP(), learn_inner_lr=True, inner_optimizer=Momentum())
    with pytest.raises(ValueError, match="learn_inner_lr='per-layer' must be"):
        MAML(MLP(), learn_inner_lr="per-layer")


def test_old_meta_sgd_checkpoint_keys_still_load():
    torch.manual_seed(0)
    trained = MAML(MLP(), learn_inner_lr="element")
    with torch.no_grad():
        trained.inner_lrs["net/0/weight"].fill_(0.123)
    old = {k.replace("inner_optimizer.lrs.", "inner_lrs."): v for k, v in trained.state_dict().items()}
    assert "inner_lrs.net/0/weight" in old
    fresh = MAML(MLP(), learn_inner_lr="element")
    fresh.load_state_dict(old)  # strict
    assert torch.all(fresh.inner_lrs["net/0/weight"] == 0.123)


@pytest.mark.parametrize(
    "rule", [lambda: MetaSGD(0.3, "element"), lambda: Momentum(0.3, 0.9)], ids=["metasgd", "momentum"]
)
def test_maml_loop_and_vmap_agree_with_other_inner_optimizers(rule):
    torch.manual_seed(0)
    backbone = Conv4(pooling="stride", out_features=5, track_running_stats=False).double()
    batch = make_episodes(3, 5, 1, 2, (1, 28, 28), 0, torch.float64, draw=torch.rand)
    grads = {}
    optimizer = rule()
    for mode in ("loop", "vmap"):
        model = MAML(backbone, inner_steps=2, task_batching=mode, inner_optimizer=optimizer).double()
        model.zero_grad()
        model.episode_loss(batch).loss.mean().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (grads["loop"] - grads["vmap"]).norm() / grads["loop"].norm() < 1e-10


def test_reptile_persistent_adam_carries_its_state_through_training_tasks_only():
    torch.manual_seed(0)
    rule = Adam(lr=0.01, persistent=True)
    model = Reptile(MLP(), inner_steps=3, inner_steps_eval=4, inner_batch_size=5, inner_optimizer=rule)
    batch = sine_batch(tasks=2)
    model.train()
    model.episode_loss(batch)
    assert rule.count == 2 * 3  # two tasks in order, three steps each
    first = rule.exp_avg_sq.get("net.0.weight").clone()
    assert first.abs().sum() > 0
    model.eval()
    model.episode_loss(batch)  # evaluation starts from the training state and leaves it alone
    assert rule.count == 6 and torch.equal(rule.exp_avg_sq.get("net.0.weight"), first)
    assert "inner_optimizer.exp_avg_sq.net/0/weight" in model.state_dict()
    with pytest.raises(ValueError, match="persistent inner optimizer .* task_batching='loop'"):
        Reptile(MLP(), inner_optimizer=Adam(persistent=True), task_batching="vmap")


def test_reptile_sgd_string_and_class_give_the_same_meta_step():
    batch = EpisodeBatch(*(t.double() for t in sine_batch(tasks=2).tensors))
    steps = []
    for rule in ("sgd", SGD(0.02)):
        torch.manual_seed(0)
        model = Reptile(MLP(), inner_lr=0.02, inner_steps=3, inner_batch_size=5, inner_optimizer=rule).double()
        model.train()
        torch.manual_seed(1)
        model.episode_loss(batch).loss.mean().backward()
        steps.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(steps[0], steps[1])


@pytest.mark.parametrize("make", [lambda: SGD(0), lambda: MetaSGD(-0.1), lambda: Momentum(0.0), lambda: Adam(-1e-3),
                                  lambda: SGD(float("inf")), lambda: SGD(float("nan"))])  # fmt: skip
def test_a_non_positive_or_non_finite_inner_lr_is_a_clear_error(make):
    with pytest.raises(ValueError, match=r"must be a positive, finite step size; set MAML's or Reptile's inner_lr"):
        make()


def test_maml_inner_lr_zero_names_the_parameter():
    with pytest.raises(ValueError, match="inner_lr"):
        MAML(MLP(), inner_lr=0.0)


# ---------------------------------------------------------------------- inner_lr is sugar, resolved in one place
def test_inner_lr_is_resolved_once_and_read_back_from_the_optimizer():
    from lightning_meta import ANIL
    from lightning_meta.inner_optimizers import LSLR, resolve_inner_optimizer

    assert isinstance(resolve_inner_optimizer("X", None, 0.3), SGD)
    assert isinstance(resolve_inner_optimizer("X", "adam", 0.3), Adam)
    per_step = resolve_inner_optimizer("X", None, 0.3, learn=True, per_step=4)
    assert isinstance(per_step, LSLR) and isinstance(per_step, MetaSGD) and per_step.steps == 4
    with pytest.raises(ValueError, match="inner_optimizer='rmsprop' must be one of"):
        resolve_inner_optimizer("X", "rmsprop", 0.3)
    head = torch.nn.Linear(Conv4(hidden=8).embedding_dim, 5)
    anil = ANIL(Conv4(hidden=8), head, inner_lr=0.3, inner_optimizer=Momentum(lr=0.05))
    assert anil.inner_lr == 0.05  # the rate that runs, not the unused argument
    maml = MAML(MLP(), inner_lr=0.2, learn_inner_lr=True)
    assert maml.inner_lr == pytest.approx(0.2)
    with torch.no_grad():
        for lr in maml.inner_optimizer.lrs.values():
            lr.fill_(0.5)
    assert maml.inner_lr == pytest.approx(0.5)  # learned: never stale


def test_meta_sgd_per_step_and_element_rates():
    opt = MetaSGD(lr=0.1, per="element", steps=2)
    p, g = {"w": torch.ones(3)}, {"w": torch.ones(3)}
    opt.bind(p)
    assert opt.lrs["w"].shape == (2, 3)
    with torch.no_grad():
        opt.lrs["w"][1].fill_(0.3)
    torch.testing.assert_close(opt.step(p, g, None, 1)[0]["w"], torch.full((3,), 0.9))
    torch.testing.assert_close(opt.step(p, g, None, 7)[0]["w"], torch.full((3,), 0.7))  # beyond: the last step's
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        MetaSGD(steps=0)
