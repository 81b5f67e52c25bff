import lightning.pytorch as pl
import pytest
import torch
from episode_factory import make_episodes

from datamodules import EpisodeBatch, Omniglot, Sinusoid
from lightning_meta import MAML, MLP, Conv4, Reptile
from lightning_meta.callbacks import DivergenceError, DivergenceGuard


def sine_batch(tasks=4, seed=0):
    dm = Sinusoid(tasks_per_batch=tasks, seed=seed)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_adapt_lowers_the_support_loss_and_is_differentiable():
    torch.manual_seed(0)
    model = MAML(MLP(), inner_lr=0.01)
    batch = sine_batch()
    x, y = batch.support_x[0], batch.support_y[0]
    before = model.inner_loss(model.backbone(x), y)
    params = model.adapt(x, y, steps=5).params
    after = model.inner_loss(model.forward_with(params, x), y)
    assert after < before
    assert params["net.0.weight"].grad_fn is not None


def test_second_order_differs_from_first_order_and_matches_finite_differences():
    torch.manual_seed(0)
    backbone = MLP(hidden=(8,)).double()
    batch = EpisodeBatch(*(t.double() for t in sine_batch(tasks=2).tensors))
    grads = {}
    for first_order in (False, True):
        model = MAML(backbone, inner_lr=0.1, first_order=first_order).double()
        model.zero_grad()
        model.episode_loss(batch)[0].mean().backward()
        grads[first_order] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert not torch.allclose(grads[False], grads[True])
    # Central finite difference of the meta-loss along one direction equals the second-order gradient.
    model = MAML(backbone, inner_lr=0.1).double()
    direction = torch.randn_like(grads[False])
    eps = 1e-6
    with torch.no_grad():
        flat = torch.nn.utils.parameters_to_vector(model.parameters())
    values = []
    for sign in (1, -1):
        torch.nn.utils.vector_to_parameters(flat + sign * eps * direction, model.parameters())
        values.append(model.episode_loss(batch)[0].mean().item())
    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(numeric - grads[False] @ direction) < 1e-6 * max(1.0, abs(numeric))


def test_maml_refuses_inference_mode():
    model = MAML(MLP())
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        model.validation_step(sine_batch(), 0)


def test_head_must_match_ways(fake_omniglot):
    model = MAML(Conv4(out_features=5, track_running_stats=False))
    dm = Omniglot(root=str(fake_omniglot), ways=2, shots=1, queries=1, rotations=False)
    trainer = pl.Trainer(fast_dev_run=1, inference_mode=False, logger=False)
    message = r"MAML's head has 5 outputs but these episodes are 2-way; set the head's out_features "
    with pytest.raises(ValueError, match=message + r"\(backbone.out_features\) to 2 or use a model trained for 2 ways"):
        trainer.fit(model, dm)


def test_maml_learns_sinusoid(tmp_path):
    pl.seed_everything(0)
    dm = Sinusoid(tasks_per_batch=10, train_episodes=8000, val_episodes=200)
    model = MAML(MLP(), inner_lr=0.01, inner_steps=1, inner_steps_eval=1,
                 optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))  # fmt: skip
    trainer = pl.Trainer(max_epochs=1, inference_mode=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)  # fmt: skip
    initial = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    trainer.fit(model, dm)
    final = trainer.callback_metrics["val/loss"].item()
    assert final < 0.4 * initial, (initial, final)  # no adaptation cannot go below ~0.7x


def image_batch(tasks=3, ways=5, shots=1, queries=2, size=28, seed=0, dtype=torch.float32):
    return make_episodes(tasks, ways, shots, queries, (1, size, size), seed, dtype, draw=torch.rand)


def meta_gradient(model, batch):
    model.zero_grad()
    model.episode_loss(batch)[0].mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_vmap_and_loop_give_the_same_meta_gradient(first_order, steps):
    torch.manual_seed(0)
    backbone = Conv4(pooling="stride", out_features=5, track_running_stats=False).double()
    batch = image_batch(dtype=torch.float64)
    grads = {}
    for mode in ("loop", "vmap"):
        model = MAML(backbone, inner_lr=0.4, inner_steps=steps, first_order=first_order, task_batching=mode)
        grads[mode] = meta_gradient(model.double(), batch)
    rel = (grads["loop"] - grads["vmap"]).norm() / grads["loop"].norm()
    assert rel < 1e-10, rel


@pytest.mark.parametrize("learn_inner_lr, shape", [(True, ()), ("element", (64, 1, 3, 3))])
def test_meta_sgd_learns_step_sizes(learn_inner_lr, shape):
    torch.manual_seed(0)
    model = MAML(Conv4(pooling="stride", out_features=5, track_running_stats=False), learn_inner_lr=learn_inner_lr)
    lr = model.inner_lrs["features/0/weight"]
    assert lr.shape == shape and torch.all(lr == 0.4)
    meta_gradient(model, image_batch())
    assert lr.grad is not None and lr.grad.abs().sum() > 0
    assert any(p is lr for p in model.parameters())  # so the outer optimizer updates it


class HeadOnlyMAML(MAML):
    """Almost No Inner Loop (Raghu et al. 2020): adapt only the head, written as a subclass."""

    def adapt_params(self):
        return {k: v for k, v in self.network.named_parameters() if k.startswith("head.")}


@pytest.mark.parametrize(
    "make", [lambda **kw: HeadOnlyMAML(**kw), lambda **kw: MAML(adapt="head", **kw)], ids=["subclass", "arg"]
)
def test_anil_adapts_only_the_head_and_still_meta_learns_the_body(make):
    torch.manual_seed(0)
    model = make(backbone=Conv4(pooling="stride", out_features=5, track_running_stats=False), inner_lr=0.5)
    batch = image_batch(tasks=1)
    adapted = model.adapt(batch.support_x[0], batch.support_y[0], steps=2).params
    assert set(adapted) == {"head.weight", "head.bias"}
    before = model.inner_loss(model.backbone(batch.support_x[0]), batch.support_y[0])
    assert model.inner_loss(model.forward_with(adapted, batch.support_x[0]), batch.support_y[0]) < before
    meta_gradient(model, batch)
    assert model.backbone.features[0].weight.grad.abs().sum() > 0


def test_second_order_maml_under_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    model = MAML(Conv4(pooling="stride", out_features=5, track_running_stats=False), inner_lr=0.4)
    batch = image_batch(tasks=2, queries=5)
    fp32 = model.episode_loss(batch)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.episode_loss(batch)[0]
    torch.testing.assert_close(bf16, fp32, rtol=0.03, atol=0.03)


def test_gradient_stand_in_is_zero_with_the_given_gradient():
    from lightning_meta.functional import gradient_stand_in

    w = torch.tensor([1.5, -2.0], requires_grad=True)
    stand_in = gradient_stand_in([w], [torch.tensor([3.0, 4.0])], divisor=2.0)
    assert stand_in.item() == 0
    (g,) = torch.autograd.grad(stand_in, [w])
    torch.testing.assert_close(g, torch.tensor([1.5, 2.0]))


def test_maml_on_miniimagenet_shaped_episodes():
    torch.manual_seed(0)
    backbone = Conv4(in_channels=3, hidden=32, image_size=84, out_features=5, track_running_stats=False)
    model = MAML(backbone, inner_lr=0.01, inner_steps=2)
    g = torch.Generator().manual_seed(0)
    batch = EpisodeBatch(
        torch.rand(2, 5, 3, 84, 84, generator=g),
        torch.arange(5).expand(2, -1),
        torch.rand(2, 10, 3, 84, 84, generator=g),
        torch.arange(5).repeat_interleave(2).expand(2, -1),
    )
    loss, logits, curve = model.episode_loss(batch)
    assert curve is None  # measured in evaluation only
    assert loss.shape == (2,) and logits.shape == (2, 10, 5)
    loss.mean().backward()
    assert backbone.features[0].weight.grad.abs().sum() > 0


def test_auto_task_batching_picks_one_path_per_phase_with_the_loop_results():
    torch.manual_seed(0)
    auto = MAML(MLP(), inner_lr=0.01, task_batching="auto").train()
    loop = MAML(MLP(), inner_lr=0.01, task_batching="loop").train()
    loop.load_state_dict(auto.state_dict())
    batch = sine_batch()
    torch.testing.assert_close(auto.episode_loss(batch)[0], loop.episode_loss(batch)[0], rtol=1e-5, atol=1e-6)
    assert set(auto._chosen_batching) == {True} and auto._chosen_batching[True] in ("loop", "vmap", "batched")
    auto.eval()
    auto.episode_loss(batch)
    assert set(auto._chosen_batching) == {True}  # evaluation is never timed: it takes training's choice


def test_auto_task_batching_evaluates_the_same_way_run_to_run(tmp_path, monkeypatch):
    # Timing made two identical `test` runs take different paths (results differing in the 5th digit).
    torch.manual_seed(0)
    model = MAML(MLP(), inner_lr=0.01, task_batching="auto")
    timed = []
    monkeypatch.setattr(MAML, "_time_task_batching", lambda self, batch: timed.append(self.training) or "vmap")
    batch = sine_batch()
    model.eval()
    first, second = (model.episode_loss(batch).loss for _ in range(2))
    assert timed == [] and model.auto_task_batching(batch) == "loop"  # no training choice: the fixed default
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    model.train().episode_loss(batch)
    assert timed == [True] and model.eval().auto_task_batching(batch) == "vmap"
    # The choice travels in the checkpoint: a later test (or a resumed fit) takes the same path, untimed.
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["lightning_meta"]["task_batching"] == "vmap"
    again = MAML(MLP(), inner_lr=0.01, task_batching="auto")
    again.on_load_checkpoint(checkpoint)
    assert again.eval().auto_task_batching(batch) == "vmap" and again.train().auto_task_batching(batch) == "vmap"
    assert timed == [True]


# ---------------------------------------------------------------------- heads (MAML and Reptile share the checks)
ALGORITHMS = {
    "MAML": lambda backbone, **kw: MAML(backbone, task_batching="loop", **kw),
    "Reptile": lambda backbone, **kw: Reptile(backbone, inner_steps=1, inner_steps_eval=1, inner_batch_size=2, **kw),
}


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize(
    "outputs, ways, train_ways, stage, episodes",
    [(5, 3, None, "fit", 3), (3, 3, 2, "fit", 2), (3, 2, 3, "fit", 2), (5, 3, None, "test", 3)],
)  # fmt: skip
def test_the_head_is_checked_against_the_episodes_of_every_split(
    algorithm, outputs, ways, train_ways, stage, episodes, fake_omniglot
):
    model = ALGORITHMS[algorithm](Conv4(out_features=outputs, track_running_stats=False))
    dm = Omniglot(root=str(fake_omniglot), ways=ways, train_ways=train_ways, shots=1, queries=1, rotations=False)
    trainer = pl.Trainer(fast_dev_run=1, inference_mode=False, logger=False, enable_progress_bar=False)
    message = f"{algorithm}'s head has {outputs} outputs but these episodes are {episodes}-way; set the "
    message += rf"head's out_features \(backbone.out_features\) to {episodes}"
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, dm) if stage == "fit" else trainer.test(model, dm)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_predicting_other_ways_than_the_head_is_a_clear_error(algorithm):
    from torch.utils.data import DataLoader

    model = ALGORITHMS[algorithm](Conv4(out_features=5, track_running_stats=False))
    trainer = pl.Trainer(inference_mode=False, logger=False, enable_progress_bar=False, enable_model_summary=False)
    five = image_batch(tasks=1, ways=5)
    probabilities = trainer.predict(model, DataLoader([five], batch_size=None))[0]
    assert probabilities.shape == (1, 10, 5)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(1, 10))
    twenty = image_batch(tasks=1, ways=20)
    message = rf"{algorithm}'s head has 5 outputs but these episodes are 20-way; set the head's out_features"
    with pytest.raises(ValueError, match=message):
        trainer.predict(model, DataLoader([twenty], batch_size=None))
    with pytest.raises(ValueError, match=message):  # a direct call while training: checked once per batch shape
        model.train().episode_loss(twenty)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_an_explicit_head_after_the_embedding(algorithm, fake_omniglot):
    torch.manual_seed(0)
    backbone = Conv4(hidden=8, track_running_stats=False)  # no out_features: it ends in the embedding
    model = ALGORITHMS[algorithm](backbone, head=torch.nn.Linear(backbone.embedding_dim, 5), adapt="head")
    assert set(model.adapt_params()) == {"head.weight", "head.bias"}
    assert model.head_outputs == 5
    batch = image_batch(tasks=2, ways=5)
    out = model.train().episode_loss(batch)
    assert out.predictions.shape == (2, 10, 5)
    out.loss.mean().backward()
    assert backbone.features[0].weight.grad is not None or algorithm == "Reptile"  # Reptile moves the adapted ones
    assert model.head.weight.grad.abs().sum() > 0
    assert {k.split(".")[0] for k in model.state_dict()} >= {"backbone", "head"}  # no duplicated network.* keys
    assert not any(k.startswith("_network") for k in model.state_dict())
    dm = Omniglot(root=str(fake_omniglot), ways=3, shots=1, queries=1, rotations=False)
    with pytest.raises(ValueError, match=r"head has 5 outputs .* set the head's out_features \(head.out_features\)"):
        pl.Trainer(fast_dev_run=1, inference_mode=False, logger=False).fit(model, dm)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_a_headless_backbone_is_refused_for_classification(algorithm, fake_omniglot):
    # `--config configs/protonet/... --model MAML`: ProtoNet's Conv4 ends in its 64-d embedding, which
    # trained silently as 64 logits on 5-way episodes.
    model = ALGORITHMS[algorithm](Conv4(track_running_stats=False))
    assert model.headless and model.head_outputs == 64
    dm = Omniglot(root=str(fake_omniglot), ways=2, shots=1, queries=1, rotations=False)
    message = rf"{algorithm}'s network has no head: Conv4 ends in its 64-d embedding, .* are 2-way; give the backbone"
    with pytest.raises(ValueError, match=message + r" a head with --model.backbone.init_args.out_features 2"):
        pl.Trainer(fast_dev_run=1, inference_mode=False, logger=False, enable_progress_bar=False).fit(model, dm)
    with pytest.raises(ValueError, match=message.replace("2-way", "5-way")):  # without a Trainer too
        model.train().episode_loss(image_batch(tasks=1, ways=5))


def test_a_backbone_without_a_known_head_is_not_checked():
    model = MAML(MLP(out_features=3))
    assert model.head_outputs is None
    model.check_episode_ways(image_batch(tasks=1, ways=5))  # nothing to compare with


def test_a_huge_inner_lr_stops_within_the_first_steps(fake_omniglot):
    # The first step's loss is compared with a constant prediction's (log 2 here): an inner_lr of 1e6
    # used to set the reference itself and only stop at epoch 2.
    data = Omniglot(str(fake_omniglot), rotations=False, ways=2, queries=3, train_episodes=20, val_episodes=2)
    model = MAML(Conv4(hidden=8, out_features=2, track_running_stats=False), inner_lr=1e6, task_batching="loop")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                         callbacks=[DivergenceGuard()])  # fmt: skip
    with pytest.raises(DivergenceError, match=r"train/loss is .* at step 1 .*MAML's inner_lr=1e\+06 is likely too"):
        trainer.fit(model, datamodule=data)
    assert trainer.global_step <= 1
