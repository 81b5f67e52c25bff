"""Advantage estimation: discounted returns, GAE and the linear feature baseline."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_discounts(owner: str, gamma: float, gae_lambda: float) -> None:
    """Raise ValueError unless the discount ``gamma`` and the GAE ``gae_lambda`` lie in (0, 1].

    A discount above 1 makes returns grow with the horizon instead of converging (Sutton and Barto,
    eq. 3.8); 0 or less ignores every future reward. Lambda interpolates between one-step TD (0) and
    Monte Carlo (1) advantages (Schulman et al. 2016, eq. 16); outside [0, 1] it weights far steps more.
    """
    for name, value, usual in (("gamma", gamma, "0.99"), ("gae_lambda", gae_lambda, "0.95 or 1.0")):
        if not (isinstance(value, int | float) and math.isfinite(value) and 0 < value <= 1):
            raise ValueError(
                f"{owner}: {name}={value!r} must lie in (0, 1]: a discount factor above 1 makes the returns grow "
                f"without bound; set --model.{name} to a value in (0, 1], usually {usual}"
            )


def gae(rewards: Tensor, values: Tensor, dones: Tensor, gamma: float = 0.99, lam: float = 1.0) -> Tensor:
    """Generalised advantage estimates (Schulman et al. 2016, eq. 16) along the last (time) dimension.

    ``delta_t = r_t + gamma * (1 - done_t) * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam *
    (1 - done_t) * A_{t+1}``; the value after the last step is 0 (episodes end with the horizon).
    With ``values = 0`` and ``lam = 1`` it is the discounted return.
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    next_value = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        alive = 1.0 - dones[..., t]
        delta = rewards[..., t] + gamma * alive * next_value - values[..., t]
        running = delta + gamma * lam * alive * running
        advantages[..., t] = running
        next_value = values[..., t]
    return advantages


def discounted_returns(rewards: Tensor, dones: Tensor, gamma: float = 0.99) -> Tensor:
    """``sum_k gamma^k r_{t+k}`` within each episode, along the last dimension."""
    return gae(rewards, torch.zeros_like(rewards), dones, gamma, 1.0)


def linear_baseline_features(obs: Tensor) -> Tensor:
    """Duan et al. 2016 (rllab's LinearFeatureBaseline): obs, obs^2, t, t^2, t^3 (t = step / 100) and 1.

    ``obs [..., T, O]`` -> ``[..., T, 2 O + 4]``.
    """
    obs = obs.float().clamp(-10, 10)
    t = torch.arange(obs.shape[-2], device=obs.device, dtype=obs.dtype) / 100.0
    t = t[:, None].expand(*obs.shape[:-1], 1)
    return torch.cat([obs, obs.square(), t, t.square(), t**3, torch.ones_like(t)], -1)


def linear_baseline(obs: Tensor, returns: Tensor, reg: float = 1e-5) -> Tensor:
    """Fit the linear feature baseline to each task's returns by ridge least squares and return its values.

    Args:
        obs: ``[B, n, T, O]`` observations of ``n`` trajectories per task.
        returns: ``[B, n, T]`` the discounted returns to fit.
        reg: ridge coefficient (scaled by 10 until the system is solvable, as in rllab).

    Returns:
        ``[B, n, T]`` the fitted values (no gradient).
    """
    with torch.no_grad():
        features = linear_baseline_features(obs).double()
        x = features.flatten(1, 2)  # [B, n*T, F]
        y = returns.double().flatten(1, 2)[..., None]
        gram, target = x.transpose(1, 2) @ x, x.transpose(1, 2) @ y
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        for _ in range(5):
            weights = torch.linalg.solve(gram + reg * eye, target)
            if torch.isfinite(weights).all():
                break
            reg *= 10
        return (features @ weights[:, None]).squeeze(-1).to(returns.dtype)


def normalize(advantages: Tensor, dims: tuple[int, ...] = (-2, -1), eps: float = 1e-8) -> Tensor:
    """Zero mean and unit variance over ``dims`` (one task's trajectories and steps by default)."""
    mean = advantages.mean(dims, keepdim=True)
    std = advantages.std(dims, keepdim=True)
    return (advantages - mean) / (std + eps)
