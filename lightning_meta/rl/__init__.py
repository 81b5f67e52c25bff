"""Meta-RL: the module base, the methods (MAML-RL, RL^2) and their kit: policies, rollouts, advantages, objectives."""

from ..bases.meta_rl import MetaRLModule
from .callbacks import TrajectoryImages, trajectory_picture
from .losses import conjugate_gradient, policy_gradient_loss, ppo_clip_loss, ratio_loss, trpo_step
from .maml_rl import MAMLRL
from .policies import CategoricalMLPPolicy, GaussianMLPPolicy, GRUPolicy, Policy, make_policy
from .returns import check_discounts, discounted_returns, gae, linear_baseline, linear_baseline_features, normalize
from .rl2 import RL2
from .rollout import Feedback, Trajectories, rollout

__all__ = [
    "CategoricalMLPPolicy",
    "GRUPolicy",
    "Feedback",
    "GaussianMLPPolicy",
    "MAMLRL",
    "MetaRLModule",
    "Policy",
    "RL2",
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
