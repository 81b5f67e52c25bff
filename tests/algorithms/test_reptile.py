import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from datamodules import EpisodeBatch
from lightning_meta import MLP, Conv4, Reptile


def test_one_outer_step_is_the_reptile_formula_by_hand():
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    model = Reptile(net, inner_lr=0.1, inner_steps=3, inner_batch_size=4, inner_optimizer="sgd", outer_lr=0.5,
                    outer_lr_anneal=False)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    batch = EpisodeBatch(torch.randn(2, 4, 2, generator=g), torch.randn(2, 4, 1, generator=g),
                         torch.randn(2, 3, 2, generator=g), torch.randn(2, 3, 1, generator=g))  # fmt: skip
    theta = [p.detach().clone() for p in net.parameters()]
    # By hand: three full-batch SGD steps of the squared error per task, then theta + eps * mean(phi - theta).
    phis = []
    for t in range(2):
        w, b = (p.clone().requires_grad_() for p in theta)
        for _ in range(3):
            loss = ((batch.support_x[t] @ w.T + b - batch.support_y[t]) ** 2).mean()
            gw, gb = torch.autograd.grad(loss, [w, b])
            w, b = (w - 0.1 * gw).detach().requires_grad_(), (b - 0.1 * gb).detach().requires_grad_()
        phis.append([w.detach(), b.detach()])
    expected = [th + 0.5 * (torch.stack([phi[i] for phi in phis]).mean(0) - th) for i, th in enumerate(theta)]

    optimizer = model.configure_optimizers()
    model.train()
    loss = model.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    for p, e in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e)


@pytest.mark.parametrize("transductive", [True, False])
def test_vmap_and_loop_agree(transductive):
    torch.manual_seed(0)
    backbone = Conv4(pooling="stride", out_features=3, track_running_stats=False).double()
    g = torch.Generator().manual_seed(0)
    batch = EpisodeBatch(
        torch.rand(2, 6, 1, 28, 28, generator=g, dtype=torch.float64),
        torch.arange(3).repeat_interleave(2).expand(2, -1),
        torch.rand(2, 6, 1, 28, 28, generator=g, dtype=torch.float64),
        torch.arange(3).repeat_interleave(2).expand(2, -1),
    )
    out = {}
    for mode in ("loop", "vmap"):
        model = Reptile(backbone, inner_steps=3, inner_batch_size=4, transductive=transductive, task_batching=mode)
        model.double().train()
        model.zero_grad()
        torch.manual_seed(1)  # the same inner mini-batch order both ways
        loss, predictions, _ = model.episode_loss(batch)
        loss.mean().backward()
        out[mode] = (predictions, torch.cat([p.grad.flatten() for p in backbone.parameters()]))
    torch.testing.assert_close(out["loop"][0], out["vmap"][0])
    torch.testing.assert_close(out["loop"][1], out["vmap"][1])


def test_non_transductive_predictions_do_not_depend_on_the_other_queries():
    torch.manual_seed(0)
    model = Reptile(Conv4(pooling="stride", out_features=2, track_running_stats=False), inner_steps_eval=2).eval()
    g = torch.Generator().manual_seed(0)
    support, labels = torch.rand(1, 2, 1, 28, 28, generator=g), torch.arange(2).unsqueeze(0)
    queries = torch.rand(1, 4, 1, 28, 28, generator=g)
    for transductive, same in ((False, True), (True, False)):
        model.transductive = transductive
        full = model.episode_loss(EpisodeBatch(support, labels, queries, torch.zeros(1, 4, dtype=torch.long)))[1]
        half = model.episode_loss(EpisodeBatch(support, labels, queries[:, :2], torch.zeros(1, 2, dtype=torch.long)))[1]
        assert torch.allclose(full[:, :2], half, atol=1e-5) == same


def test_outer_lr_anneals_linearly_to_zero(tmp_path):
    from datamodules import Sinusoid

    model = Reptile(MLP(), inner_lr=0.01, inner_steps=2, inner_steps_eval=2, outer_lr=0.5)
    dm = Sinusoid(tasks_per_batch=5, train_episodes=50, val_episodes=5)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         inference_mode=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, dm)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_reptile_learns_sinusoid(tmp_path):
    """A short run must halve the query MSE after fine-tuning (the untrained MLP cannot)."""
    from datamodules import Sinusoid

    pl.seed_everything(0)
    dm = Sinusoid(tasks_per_batch=5, train_episodes=2000, val_episodes=100)
    model = Reptile(MLP(), inner_lr=0.02, inner_steps=10, inner_steps_eval=10, inner_optimizer="sgd",
                    outer_lr=0.5, outer_lr_anneal=False, task_batching="vmap")  # fmt: skip
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         inference_mode=False, default_root_dir=tmp_path)  # fmt: skip
    initial = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    trainer.fit(model, dm)
    final = trainer.callback_metrics["val/loss"].item()
    assert final < 0.5 * initial, (initial, final)
