"""Policy-gradient pieces: GAE, the linear baseline, the PPO surrogate's gradient, the TRPO step's KL bound."""

import torch
from torch.distributions import kl_divergence

from lightning_meta.functional import forward_with
from lightning_meta.rl import (
    CategoricalMLPPolicy,
    GaussianMLPPolicy,
    conjugate_gradient,
    discounted_returns,
    gae,
    linear_baseline,
    policy_gradient_loss,
    ppo_clip_loss,
    trpo_step,
)


def test_gae_matches_a_hand_computed_example():
    rewards = torch.tensor([1.0, 0.0, 2.0])
    values = torch.tensor([0.5, 1.0, 1.5])
    dones = torch.zeros(3)
    gamma, lam = 0.9, 0.8
    d2 = 2.0 - 1.5  # the value after the horizon is 0
    d1 = 0.0 + 0.9 * 1.5 - 1.0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    torch.testing.assert_close(gae(rewards, values, dones, gamma, lam), torch.tensor([a0, a1, a2]))


def test_gae_stops_at_episode_ends_and_returns_are_discounted():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0])
    dones = torch.tensor([0.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(discounted_returns(rewards, dones, 0.5), torch.tensor([1.5, 1.0, 1.5, 1.0]))


def test_linear_baseline_fits_a_return_that_is_linear_in_its_features():
    generator = torch.Generator().manual_seed(0)
    obs = torch.randn(2, 3, 10, 2, generator=generator)
    returns = 2 * obs[..., 0] - obs[..., 1].square() + 0.5
    torch.testing.assert_close(linear_baseline(obs, returns), returns, atol=1e-3, rtol=1e-3)


def _gaussian_batch(seed: int = 0):
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(3, 2, hidden_sizes=(8,))
    obs = torch.randn(64, 3)
    with torch.no_grad():
        out = policy(obs)
        actions = policy.sample(out)
    return policy, obs, actions, out, torch.randn(64)


def test_ppo_surrogate_gradient_at_the_old_policy_is_the_policy_gradient():
    for policy, obs, actions, out, adv in (_gaussian_batch(), _categorical_batch()):
        old_log_probs = policy.distribution(out).log_prob(actions)
        params = list(policy.parameters())
        log_probs = policy.distribution(policy(obs)).log_prob(actions)
        ppo = torch.autograd.grad(ppo_clip_loss(log_probs, old_log_probs, adv, 0.2), params, retain_graph=True)
        pg = torch.autograd.grad(policy_gradient_loss(log_probs, adv), params)
        for a, b in zip(ppo, pg, strict=True):
            torch.testing.assert_close(a, b)
        assert any(g.abs().sum() > 0 for g in pg)


def _categorical_batch():
    torch.manual_seed(1)
    policy = CategoricalMLPPolicy(3, 4, hidden_sizes=(8,))
    obs = torch.randn(64, 3)
    with torch.no_grad():
        out = policy(obs)
        actions = policy.sample(out)
    return policy, obs, actions, out, torch.randn(64)


def test_conjugate_gradient_solves_a_small_system():
    a = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    b = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(conjugate_gradient(lambda v: a @ v, b, 10), torch.linalg.solve(a, b))


def test_trpo_step_improves_the_surrogate_within_the_kl_bound():
    policy, obs, actions, out, adv = _gaussian_batch()
    old = policy.distribution(out)
    old_log_probs = old.log_prob(actions)
    params = dict(policy.named_parameters())

    def objective():
        dist = policy.distribution(forward_with(policy, params, obs))
        ratio = (dist.log_prob(actions) - old_log_probs).exp()
        return -(ratio * adv).mean(), kl_divergence(old, dist).mean()

    before = [p.detach().clone() for p in policy.parameters()]
    for max_kl in (0.01, 0.001):
        for p, b in zip(policy.parameters(), before, strict=True):
            p.data.copy_(b)
        stats = trpo_step(list(policy.parameters()), objective, max_kl=max_kl)
        with torch.no_grad():
            loss, kl = objective()
        assert stats["accepted"] == 1
        assert float(kl) <= max_kl
        assert float(kl) > 0.1 * max_kl  # the step uses the trust region, not a tiny move
        assert float(loss) < float(stats["loss_before"])


def test_trajectory_picture_draws_goals_and_both_rollouts():
    from lightning_meta.rl import trajectory_picture

    goals = torch.tensor([[0.4, -0.4], [-0.2, 0.3]])
    pre = torch.full((2, 3, 10, 2), -0.3)  # apart from the post-adaptation paths, which start at the origin
    post = goals[:, None, None, :] * torch.linspace(0, 1, 10)[None, None, :, None]
    picture = trajectory_picture(goals, pre, post.expand(2, 3, 10, 2), size=32)
    assert picture.shape == (3, 32, 2 * 32 + 2)
    red = (picture[0] == 1) & (picture[1] == 0) & (picture[2] == 0)
    green = (picture[1] == 0.7) & (picture[0] == 0.1)
    blue = (picture[2] == 1) & (picture[0] == 0.2)
    assert red[:, :32].any() and red[:, 34:].any() and green.any() and blue.any()
    # The first goal (0.4, -0.4) is drawn to the lower right of its panel.
    rows, cols = red[:, :32].nonzero(as_tuple=True)
    assert rows.float().mean() > 16 and cols.float().mean() > 16
