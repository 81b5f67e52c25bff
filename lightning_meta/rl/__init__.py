"""Shared meta-RL pieces: policies, rollouts, advantages, policy-gradient objectives, TRPO, the module base."""

from .callbacks import TrajectoryImages, trajectory_picture
from .losses import conjugate_gradient, policy_gradient_loss, ppo_clip_loss, ratio_loss, trpo_step
from .module import MetaRLModule
from .policies import CategoricalMLPPolicy, GaussianMLPPolicy, GRUPolicy, Policy, make_policy
from .returns import check_discounts, discounted_returns, gae, linear_baseline, linear_baseline_features, normalize
from .rollout import Trajectories, rollout

__all__ = [
    "CategoricalMLPPolicy",
    "GRUPolicy",
    "GaussianMLPPolicy",
    "MetaRLModule",
    "Policy",
    "Trajectories",
    "TrajectoryImages",
    "check_discounts",
    "conjugate_gradient",
    "discounted_returns",
    "gae",
    "linear_baseline",
    "linear_baseline_features",
    "make_policy",
    "normalize",
    "policy_gradient_loss",
    "ppo_clip_loss",
    "ratio_loss",
    "rollout",
    "trajectory_picture",
    "trpo_step",
]
