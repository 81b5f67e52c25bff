"""Policies for meta-RL as plain ``nn.Module``s, callable with other parameters through ``forward_with``.

``forward(obs)`` returns a tensor of distribution parameters (so that ``torch.func.vmap`` can run
one parameter set per task), and :meth:`distribution` turns it into a
``torch.distributions.Distribution`` whose ``log_prob`` is one number per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Independent, Normal


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class Policy(nn.Module):
    """Base of the policies: distribution parameters from :meth:`forward`, then :meth:`distribution`."""

    discrete: bool = False

    def distribution(self, out: Tensor) -> Distribution:
        """The action distribution for the output of :meth:`forward`."""
        raise NotImplementedError

    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw actions from :meth:`distribution` ``(out)``, with ``generator`` when given (reproducible evaluation)."""
        raise NotImplementedError


class GaussianMLPPolicy(Policy):
    """Diagonal Gaussian policy: a tanh MLP for the mean and a learned, state-independent log-std.

    Finn et al. 2017 (sec. 5.3) use two hidden layers of 100 units with ReLU; this follows the
    rllab/ProMP code that their results come from (tanh, learned log-std).

    Args:
        obs_dim: observation size.
        action_dim: action size.
        hidden_sizes: hidden layer widths.
        init_std: initial standard deviation of the actions.
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: Sequence[int] = (100, 100), init_std: float = 1.0):
        super().__init__()
        if not init_std > 0:
            raise ValueError(f"init_std={init_std} must be positive")
        self.action_dim = action_dim
        self.mean = _mlp([obs_dim, *hidden_sizes, action_dim])
        self.log_std = nn.Parameter(torch.full((action_dim,), math.log(init_std)))

    def forward(self, obs: Tensor) -> Tensor:
        """``[..., 2 * action_dim]``: the mean, then the log-std (float32 under autocast too)."""
        mean = self.mean(obs).float()
        return torch.cat([mean, self.log_std.float().expand_as(mean)], -1)

    def distribution(self, out: Tensor) -> Distribution:
        mean, log_std = out.split(self.action_dim, -1)
        return Independent(Normal(mean, log_std.exp(), validate_args=False), 1, validate_args=False)

    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean, log_std = out.split(self.action_dim, -1)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + log_std.exp() * noise


class CategoricalMLPPolicy(Policy):
    """Categorical policy over ``num_actions`` actions: a tanh MLP giving the logits.

    Args:
        obs_dim: observation size.
        num_actions: the number of discrete actions.
        hidden_sizes: hidden layer widths.
    """

    discrete = True

    def __init__(self, obs_dim: int, num_actions: int, hidden_sizes: Sequence[int] = (100, 100)):
        super().__init__()
        self.logits = _mlp([obs_dim, *hidden_sizes, num_actions])

    def forward(self, obs: Tensor) -> Tensor:
        """``[..., num_actions]`` logits (float32)."""
        return self.logits(obs).float()

    def distribution(self, out: Tensor) -> Distribution:
        return Categorical(logits=out, validate_args=False)

    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return sample_categorical(out, generator)


def sample_categorical(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Indices drawn from ``softmax(logits)`` over the last dimension."""
    probs = logits.softmax(-1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])


def make_policy(obs_dim: int, action_dim: int, discrete: bool, hidden_sizes: Sequence[int], init_std: float) -> Policy:
    """The MLP policy for an environment: categorical for discrete actions, else Gaussian."""
    if discrete:
        return CategoricalMLPPolicy(obs_dim, action_dim, hidden_sizes)
    return GaussianMLPPolicy(obs_dim, action_dim, hidden_sizes, init_std)


class GRUPolicy(nn.Module):
    """Recurrent actor-critic of RL^2 (Duan et al. 2016, sec. 2.2): a GRU over (obs, previous action, reward, done).

    The hidden state is kept across the episodes of a trial, so the policy can learn to explore
    in early episodes and exploit what it found in later ones.

    Args:
        obs_dim: observation size.
        action_dim: action size (the number of actions when ``discrete``).
        discrete: categorical (one-hot previous action) or Gaussian actions.
        hidden_size: GRU units.
        init_std: initial standard deviation of Gaussian actions.
    """

    def __init__(self, obs_dim: int, action_dim: int, discrete: bool, hidden_size: int = 64, init_std: float = 1.0):
        super().__init__()
        self.discrete, self.action_dim, self.hidden_size = discrete, action_dim, hidden_size
        self.gru = nn.GRU(obs_dim + action_dim + 2, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, action_dim)
        self.value = nn.Linear(hidden_size, 1)
        self.log_std = nn.Parameter(torch.full((action_dim,), math.log(init_std)))

    def encode_action(self, action: Tensor) -> Tensor:
        """An action as GRU input: one-hot indices when discrete, else the action vector."""
        if self.discrete:
            return nn.functional.one_hot(action.long(), self.action_dim).float()
        return action.float()

    def inputs(self, obs: Tensor, prev_action: Tensor, reward: Tensor, done: Tensor) -> Tensor:
        """One step's GRU input ``[..., obs_dim + action_dim + 2]``; ``prev_action`` from :meth:`encode_action`."""
        return torch.cat([obs.float(), prev_action, reward[..., None].float(), done[..., None].float()], -1)

    def forward(self, inputs: Tensor, hidden: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``inputs [N, T, I]`` -> (distribution parameters ``[N, T, D]``, values ``[N, T]``, last hidden state)."""
        features, hidden = self.gru(inputs, hidden)
        features = features.float()
        head = self.head(features).float()
        if not self.discrete:
            head = torch.cat([head, self.log_std.float().expand_as(head)], -1)
        return head, self.value(features).float()[..., 0], hidden

    def distribution(self, out: Tensor) -> Distribution:
        if self.discrete:
            return Categorical(logits=out, validate_args=False)
        mean, log_std = out.split(self.action_dim, -1)
        return Independent(Normal(mean, log_std.exp(), validate_args=False), 1, validate_args=False)

    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.discrete:
            return sample_categorical(out, generator)
        mean, log_std = out.split(self.action_dim, -1)
        return mean + log_std.exp() * torch.randn(mean.shape, generator=generator, device=mean.device)
