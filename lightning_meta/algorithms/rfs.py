"""RFS (Tian et al. 2020): a pre-trained embedding, a logistic regression per episode, and self-distillation."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.base import LabelledBatch

from ..bases.episodic import at_least_float32
from ..bases.pretrained import Head, PretrainedModule
from .baseline import Baseline


class RFS(Baseline):
    """RFS (Tian et al. 2020, "Rethinking Few-Shot Image Classification: a Good Embedding Is All You Need?").

    Pre-trains with a linear classifier over all training classes (section 3.1); at evaluation
    each episode's support embeddings are L2-normalised (their section 4.7 finds this helps) and a
    multinomial logistic regression is fitted on them with L-BFGS (section 3.1; their code uses
    scikit-learn's ``LogisticRegression``, whose objective ``C * sum(cross-entropy) + |W|^2 / 2``
    with an unpenalised bias is the one minimised here). With ``teacher``, the model is trained by
    self-distillation from a trained one (born-again networks, section 3.3): the loss is
    ``(1 - distill_alpha) * CE + distill_alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
    the paper's alpha = beta = 0.5 and T = 4 by default.

    Args:
        backbone: embedding network (Tian et al. use ResNet-12 with average pooling, 640-d).
        logistic_c: the inverse L2 strength ``C`` of the logistic regression (scikit-learn's default 1.0).
        teacher: path of a trained checkpoint of this family (the previous generation) to distil
            from; loaded when a fit starts, not saved in this module's checkpoints.
        distill_alpha: weight of the distillation term (the cross-entropy gets ``1 - distill_alpha``).
        distill_temperature: the temperature ``T``.
        **kwargs: the other arguments of :class:`PretrainedModule`; ``head_steps`` are the L-BFGS
            iterations of the logistic regression, whose step its line search picks (``head_lr`` is unused).
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        logistic_c: float = 1.0,
        teacher: str | None = None,
        distill_alpha: float = 0.5,
        distill_temperature: float = 4.0,
        **kwargs: Any,
    ) -> None:
        if not logistic_c > 0:
            raise ValueError(f"logistic_c={logistic_c!r} must be positive (the inverse of the L2 strength)")
        if not 0 <= distill_alpha <= 1:
            raise ValueError(f"distill_alpha={distill_alpha!r} must lie in [0, 1]")
        if not distill_temperature > 0:
            raise ValueError(f"distill_temperature={distill_temperature!r} must be positive")
        super().__init__(backbone, **kwargs)
        self.logistic_c, self.teacher_path = logistic_c, teacher
        self.distill_alpha, self.distill_temperature = distill_alpha, distill_temperature
        self.teacher: PretrainedModule | None = None
        # The teacher is a frozen submodule (moved with the model) but not part of the checkpoint.
        self._register_state_dict_hook(_drop_teacher)
        self.register_load_state_dict_post_hook(_teacher_not_missing)

    def episode_features(self, z: Tensor) -> Tensor:
        return F.normalize(z, dim=-1)

    def episode_head_loss(self, head: Head, z: Tensor, y: Tensor) -> Tensor:
        logits = self.episode_head_logits(head, z)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") + self.episode_head_penalty(head)

    def episode_head_penalty(self, head: Head) -> Tensor:
        return head[0].square().sum() / (2 * self.logistic_c)

    def fit_episode_head(self, support: Tensor, support_y: Tensor, ways: int) -> Head:
        """The logistic regression of each episode: ``head_steps`` iterations of L-BFGS (strong Wolfe)."""
        support = support.detach()
        head = [t.requires_grad_() for t in self.init_episode_head(support, support_y, ways)]
        optimizer = torch.optim.LBFGS(
            head, lr=1.0, max_iter=self.head_steps, tolerance_grad=1e-6, tolerance_change=1e-9,
            line_search_fn="strong_wolfe",
        )  # fmt: skip

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = self.episode_head_loss(head, support, support_y)
            loss.backward()
            return loss

        optimizer.step(closure)
        return [t.detach() for t in head]

    # ------------------------------------------------------------------ self-distillation
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.teacher_path is not None and self.teacher is None:
            self.teacher = self.load_teacher(self.teacher_path)

    def load_teacher(self, path: str) -> PretrainedModule:
        """The frozen teacher from the checkpoint at ``path``; its classifier must have this model's classes."""
        from ..checkpoints import load_checkpoint

        try:
            teacher = load_checkpoint(path)
        except ValueError as err:
            if "backbone" not in str(err):
                raise
            # Written outside the CLI: born-again generations share the student's architecture.
            teacher = load_checkpoint(path, backbone=copy.deepcopy(self.backbone))
        if not isinstance(teacher, PretrainedModule) or teacher.classifier is None:
            raise ValueError(
                f"teacher={path} holds a {type(teacher).__name__} without a pre-training classifier; pass a "
                "checkpoint of Baseline, BaselinePlusPlus or RFS"
            )
        if teacher.num_classes != self.num_classes:
            raise ValueError(
                f"teacher={path} classifies {teacher.num_classes} classes but this model {self.num_classes}; "
                "distil from a teacher trained on the same training split"
            )
        teacher.requires_grad_(False)
        return teacher.eval()

    def train(self, mode: bool = True) -> RFS:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # no dropout or batch-norm updates in the teacher
        return self

    def distillation_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch (Hinton et al. 2015)."""
        t = self.distill_temperature
        log_student = F.log_softmax(at_least_float32(student) / t, dim=-1)
        log_teacher = F.log_softmax(at_least_float32(teacher) / t, dim=-1)
        return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * t * t

    def pretraining_loss(self, logits: Tensor, batch: LabelledBatch) -> Tensor:
        ce = super().pretraining_loss(logits, batch)
        if self.teacher is None:
            return ce
        with torch.no_grad():
            teacher = self.teacher.classify(batch.images)
        return (1 - self.distill_alpha) * ce + self.distill_alpha * self.distillation_loss(logits, teacher)


def _drop_teacher(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + "teacher.")]:
        del state[key]


def _teacher_not_missing(module: nn.Module, incompatible: Any) -> None:
    missing = [k for k in incompatible.missing_keys if k.startswith("teacher.") or ".teacher." in k]
    for key in missing:
        incompatible.missing_keys.remove(key)
