"""TensorBoard pictures of meta-RL rollouts: they live with the other diagnostics in :mod:`lightning_meta.callbacks`.

Kept as this module's names so the RL kit reads as one package, and so the meta-RL base can name
the callback without importing the RL package (which imports the base).
"""

from ..callbacks import TrajectoryImages, trajectory_picture

__all__ = ["TrajectoryImages", "trajectory_picture"]
