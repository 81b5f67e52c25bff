import lightning.pytorch as pl
import pytest
import torch

from datamodules import EpisodeBatch, Omniglot, Sinusoid
from lightning_meta import MAML, MLP, Conv4


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
    params = model.adapt(x, y, steps=5)
    after = model.inner_loss(model.forward_with(params, x), y)
    assert after < before
    assert params["net.0.weight"].grad_fn is not None


def test_second_order_differs_from_first_order_and_matches_finite_differences():
    torch.manual_seed(0)
    backbone = MLP(hidden=(8,)).double()
    batch = EpisodeBatch(*(t.double() for t in sine_batch(tasks=2)))
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
    with pytest.raises(ValueError, match="ends in 5 outputs but the 'train' episodes are 2-way"):
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
