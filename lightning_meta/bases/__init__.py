"""The four bases, side by side: every method subclasses one and overrides its hooks.

- :class:`EpisodicModule` (``episodic.py``): episodes in; loss, accuracy and logging out. A method
  implements ``episode_logits`` (metric methods: ProtoNet, MatchingNet, R2-D2, MetaOptNet).
- :class:`GradientModule` (``gradient.py``): an ``EpisodicModule`` that adapts a copy of its
  weights per task with the functional inner loop (MAML, ANIL, MAML++, Reptile, MetaNetwork).
- :class:`PretrainedModule` (``pretrained.py``): an ``EpisodicModule`` pre-trained as a classifier
  on labelled batches, fitting a new head per episode (Baseline, Baseline++, RFS).
- :class:`MetaRLModule` (``meta_rl.py``): a batch of tasks of an environment, rollouts and
  returns (MAML-RL, RL^2).
"""

from .episodic import AdaptationCurve, EpisodeOutput, EpisodicModule
from .gradient import GradientModule
from .meta_rl import MetaRLModule
from .pretrained import PretrainedModule

__all__ = ["AdaptationCurve", "EpisodeOutput", "EpisodicModule", "GradientModule", "MetaRLModule", "PretrainedModule"]
