"""Pre-train + fine-tune baselines: Baseline and Baseline++ (Chen et al. 2019), RFS (Tian et al. 2020).

Each is trained as an ordinary classifier over all training classes on labelled batches
(``train_batches="labelled"`` of the datamodule) and evaluated on the same fixed validation and
test episodes as every other module, by fitting a new head on each episode's support
embeddings; with ``finetune_backbone`` the whole backbone is fine-tuned per episode too
(P>M>F, Hu et al. 2022).
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call

from datamodules.base import LabelledBatch
from datamodules.episodes import EpisodeBatch, as_episode_batch, episode_ways

from ..backbones import Conv4
from ..base import EpisodicModule, at_least_float32, embed_episode
from ..functional import inner_loop
from ..inner_optimizers import Momentum
from ..memory_format import channels_last_argument, channels_last_callbacks
from ..precision import solver_precision

#: An episode head: its tensors with a leading task dimension (weights ``[B, N, D]``, bias ``[B, N]``).
Head = list[Tensor]


class CosineClassifier(nn.Module):
    """``scale * cos(z, w_c)`` for every class ``c``: the classifier of Baseline++ (Chen et al. 2019, section 3.2)."""

    def __init__(self, in_features: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(in_features, num_classes, bias=False).weight.detach().clone())
        self.scale = scale

    def forward(self, z: Tensor) -> Tensor:
        return self.scale * F.normalize(z, dim=-1) @ F.normalize(self.weight, dim=-1).T


class PretrainedModule(EpisodicModule):
    """Base of the pre-train + fine-tune baselines: supervised pre-training, a head fitted per episode.

    Training is cross-entropy over all ``num_classes`` training classes on labelled batches
    (:class:`~datamodules.base.LabelledBatch`, from a datamodule with ``train_batches="labelled"``;
    the CLI links the datamodule's ``num_train_classes`` to ``num_classes``). Evaluation embeds
    each episode, fits a new head on the support embeddings (:meth:`fit_episode_head`) and
    predicts the queries with it; the pre-training classifier is not used there. With
    ``finetune_backbone`` the backbone is then fine-tuned with that head on the support set for
    ``finetune_steps`` steps of SGD with momentum 0.9 (P>M>F, Hu et al. 2022, section 3.3; without
    its support augmentation), on a copy of its weights, so the module is unchanged afterwards.

    A subclass names its pre-training classifier (:meth:`make_classifier`) and its episode head
    (:meth:`init_episode_head`, :meth:`episode_head_logits`, optionally :meth:`fit_episode_head`,
    :meth:`episode_features` and :meth:`episode_head_penalty`).

    Args:
        backbone: embedding network without a head of its own; default ``Conv4(in_channels=1)``.
        num_classes: classes of the pre-training classifier (the training split's; the CLI links the
            datamodule's ``num_train_classes``); None builds it from the checkpoint that is loaded.
        head_steps: optimiser steps (full batch) that fit each episode's head.
        head_lr: learning rate of the episode head's optimiser.
        finetune_backbone: fine-tune the whole backbone per episode at evaluation (P>M>F).
        finetune_steps: SGD steps of that fine-tuning (50 in Hu et al. 2022).
        finetune_lr: its learning rate (Hu et al. pick one of 0, 1e-4, 1e-3, 1e-2 on validation episodes).
        channels_last: deprecated; this module asks the Trainer for the
            :class:`~lightning_meta.memory_format.ChannelsLast` callback (False here turns that off).
        optimizer: pre-training optimizer factory.
        lr_scheduler: optional scheduler factory, stepped once per epoch.
    """

    #: Fitting a head, and fine-tuning, take gradients at validation and test.
    needs_grad_in_eval = True

    def __init__(
        self,
        backbone: nn.Module | None = None,
        num_classes: int | None = None,
        head_steps: int = 100,
        head_lr: float = 0.01,
        finetune_backbone: bool = False,
        finetune_steps: int = 50,
        finetune_lr: float = 0.01,
        channels_last: bool | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        backbone = backbone if backbone is not None else Conv4()
        if getattr(backbone, "head", None) is not None:
            raise ValueError(
                f"the backbone {type(backbone).__name__} has a head of its own; {type(self).__name__} adds its "
                "classifier on the embedding: build the backbone with out_features=None"
            )
        for name, value in (("num_classes", num_classes), ("head_steps", head_steps)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a whole number of 1 or more")
        if not isinstance(finetune_steps, int) or finetune_steps < 0:
            raise ValueError(f"finetune_steps={finetune_steps!r} must be a whole number of 0 or more")
        for name, rate in (("head_lr", head_lr), ("finetune_lr", finetune_lr)):
            if not rate >= 0:
                raise ValueError(f"{name}={rate!r} must be 0 or more")
        super().__init__(backbone, optimizer, lr_scheduler)
        self.num_classes, self.head_steps, self.head_lr = num_classes, head_steps, head_lr
        self.finetune_backbone, self.finetune_steps, self.finetune_lr = finetune_backbone, finetune_steps, finetune_lr
        self.wants_channels_last = channels_last_argument(type(self).__name__, channels_last, True)
        self.classifier: nn.Module | None = None
        if num_classes is not None:
            self._build_classifier(num_classes)

    def configure_callbacks(self) -> Any:
        """Ask the Trainer for :class:`~lightning_meta.memory_format.ChannelsLast` when the module wants it."""
        return channels_last_callbacks(self, super().configure_callbacks())

    # ------------------------------------------------------------------ hooks of the methods
    def make_classifier(self, num_classes: int) -> nn.Module:
        """The pre-training classifier from ``[N, D]`` embeddings to ``[N, num_classes]`` logits."""
        raise NotImplementedError

    def episode_features(self, z: Tensor) -> Tensor:
        """What the episode head sees of the embeddings ``[B, M, D]``; the embeddings themselves by default."""
        return z

    def init_episode_head(self, support: Tensor, support_y: Tensor, ways: int) -> Head:
        """The starting head of each episode, from its support features ``[B, N*K, D]``.

        Without randomness: the evaluation of an episode must not depend on the process or the episodes before it.
        """
        raise NotImplementedError

    def episode_head_logits(self, head: Head, z: Tensor) -> Tensor:
        """``[B, M, N]`` logits of features ``[B, M, D]`` under the episode heads."""
        raise NotImplementedError

    def episode_head_penalty(self, head: Head) -> Tensor | float:
        """A penalty added to the fitting loss (RFS's L2 term); none by default."""
        return 0.0

    def episode_head_loss(self, head: Head, z: Tensor, y: Tensor) -> Tensor:
        """The fitting loss: each episode's mean support cross-entropy, summed over episodes, plus the penalty.

        Summed, so the gradient of every episode's head is that of its own loss.
        """
        logits = self.episode_head_logits(head, z)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]
        return loss + self.episode_head_penalty(head)

    def fit_episode_head(self, support: Tensor, support_y: Tensor, ways: int) -> Head:
        """Fit the heads on the support features ``[B, N*K, D]``: ``head_steps`` full-batch steps of Adam.

        Chen et al. (section 4.1) train the new classifier for 100 iterations on batches of 4; their
        code uses SGD (momentum 0.9, weight decay 1e-3). Adam, with the same weight decay, takes
        steps that do not depend on the scale of the features: an untrained backbone's are ~100x
        smaller than a trained one's, and 100 SGD steps at lr 0.01 leave its head near chance.
        """
        support = support.detach()
        head = [t.detach().clone().requires_grad_() for t in self.init_episode_head(support, support_y, ways)]
        optimizer = torch.optim.Adam(head, lr=self.head_lr, weight_decay=1e-3)
        for _ in range(self.head_steps):
            optimizer.zero_grad(set_to_none=True)
            self.episode_head_loss(head, support, support_y).backward()
            optimizer.step()
        return [t.detach() for t in head]

    # ------------------------------------------------------------------ pre-training
    def _build_classifier(self, num_classes: int) -> None:
        self.classifier = self.make_classifier(num_classes)
        self.num_classes = num_classes
        self.hparams["num_classes"] = num_classes  # so that a checkpoint rebuilds the classifier

    def _episodes_error(self) -> str:
        name = type(self).__name__
        return (
            f"{name} pre-trains on labelled batches over all training classes, not on episodes; set the "
            "datamodule's train_batches to 'labelled' (--data.train_batches labelled)"
        )

    def embed(self, images: Tensor) -> Tensor:
        """``[N, D]`` embeddings of ``[N, C, H, W]`` images, at least float32."""
        return at_least_float32(self.backbone(images))

    def classify(self, images: Tensor) -> Tensor:
        """``[N, num_classes]`` logits of the pre-training classifier."""
        if self.classifier is None:
            raise ValueError(
                f"{type(self).__name__} has no pre-training classifier yet; pass num_classes (a datamodule's "
                "num_train_classes; the CLI passes it for a datamodule with train_batches='labelled')"
            )
        return self.classifier(self.embed(images))

    def pretraining_loss(self, logits: Tensor, batch: LabelledBatch) -> Tensor:
        """The pre-training loss of a batch: cross-entropy by default."""
        return F.cross_entropy(at_least_float32(logits), batch.labels)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if isinstance(batch, EpisodeBatch) or (isinstance(batch, (tuple, list)) and len(batch) != 2):
            raise ValueError(self._episodes_error())
        labelled = LabelledBatch(*batch)
        logits = self.classify(labelled.images)
        loss = self.pretraining_loss(logits, labelled)
        size = len(labelled.labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/acc", (logits.argmax(-1) == labelled.labels).float().mean(), prog_bar=True, batch_size=size)
        return loss

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the classifier with the checkpoint's number of classes when the module has none yet."""
        super().on_load_checkpoint(checkpoint)
        weight = checkpoint.get("state_dict", {}).get("classifier.weight")
        if self.classifier is None and weight is not None:
            self._build_classifier(int(weight.shape[0]))

    # ------------------------------------------------------------------ evaluation
    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        batch = as_episode_batch(batch)
        support, query = embed_episode(self.backbone, batch)
        ways = episode_ways(batch)
        with torch.enable_grad(), solver_precision(support):
            head = self.fit_episode_head(self.episode_features(support.detach()), batch.support_y, ways)
        if not self.finetune_backbone or self.finetune_steps == 0:
            with solver_precision(query):
                return self.episode_head_logits(head, self.episode_features(query))
        logits = []
        for t in range(batch.num_tasks):
            task_head = [h[t : t + 1] for h in head]
            params, task_head = self.finetune_episode(batch.support_x[t], batch.support_y[t], task_head)
            z = self._embed_with(params, batch.query_x[t])
            with solver_precision(z):
                logits.append(self.episode_head_logits(task_head, self.episode_features(z[None])))
        return torch.cat(logits)

    def _embed_with(self, params: dict[str, Tensor], images: Tensor) -> Tensor:
        # Copies of the buffers too: batch-norm statistics of the module stay as they were.
        state = {**{n: b.clone() for n, b in self.backbone.named_buffers()}, **params}
        return at_least_float32(functional_call(self.backbone, state, (images,)))

    def finetune_episode(self, support_x: Tensor, support_y: Tensor, head: Head) -> tuple[dict[str, Tensor], Head]:
        """Fine-tune a copy of the backbone's weights and the fitted head on one episode's support set.

        ``finetune_steps`` steps of SGD with momentum 0.9 and ``finetune_lr`` on the support
        cross-entropy (P>M>F, Hu et al. 2022, section 3.3). Returns the fine-tuned weights (by
        name, for ``torch.func.functional_call``) and head; the module's own weights are untouched.
        """
        start = {n: p.detach() for n, p in self.backbone.named_parameters()}
        start.update({f"episode_head.{i}": h.detach() for i, h in enumerate(head)})
        heads = len(head)

        def support_loss(params: dict[str, Tensor]) -> Tensor:
            z = self._embed_with({n: p for n, p in params.items() if not n.startswith("episode_head.")}, support_x)
            with solver_precision(z):
                task_head = [params[f"episode_head.{i}"] for i in range(heads)]
                return self.episode_head_loss(task_head, self.episode_features(z[None]), support_y[None])

        # Gradients by autograd.grad (inner_loop's), not backward: nothing lands in the module's .grad (or DDP's hooks).
        params = start
        if self.finetune_lr > 0:  # Momentum refuses a zero rate, which changes nothing
            params = inner_loop(support_loss, start, Momentum(self.finetune_lr, 0.9), self.finetune_steps).params
        head = [params.pop(f"episode_head.{i}") for i in range(heads)]
        return params, head


class Baseline(PretrainedModule):
    """Baseline (Chen et al. 2019, "A Closer Look at Few-shot Classification", section 3.1).

    Pre-trains the backbone with a linear classifier over all training classes; at evaluation a new
    linear head (zero-initialised) is fitted on each episode's support embeddings with Adam (see
    :meth:`PretrainedModule.fit_episode_head`) and classifies the queries. The arguments are
    those of :class:`PretrainedModule`.
    """

    def make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(cast(int, self.backbone.embedding_dim), num_classes)

    def init_episode_head(self, support: Tensor, support_y: Tensor, ways: int) -> Head:
        tasks, _, dim = support.shape
        return [support.new_zeros(tasks, ways, dim), support.new_zeros(tasks, ways)]

    def episode_head_logits(self, head: Head, z: Tensor) -> Tensor:
        weight, bias = head
        return z @ weight.transpose(1, 2) + bias.unsqueeze(1)


class BaselinePlusPlus(Baseline):
    """Baseline++ (Chen et al. 2019, section 3.2): a cosine-similarity classifier with a scale.

    Logits are ``scale`` times the cosine similarity between the embedding and each class's weight
    vector, in pre-training (over all training classes) and in each episode's head. The episode
    head starts from the normalised class means of the support embeddings (weight imprinting,
    deterministic; Chen et al. start from random weights) and is fitted as Baseline's.

    Args:
        scale: the scale of the cosine similarities; None follows Chen et al.'s code: 2 for up to
            200 classes, 10 for more (so 10 for the 4112 Omniglot training classes, 2 in a 5-way episode).
        **kwargs: the arguments of :class:`PretrainedModule`.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        scale: float | None = None,
        **kwargs: Any,
    ) -> None:
        if scale is not None and not scale > 0:
            raise ValueError(f"scale={scale!r} must be positive, or None for Chen et al.'s 2 or 10")
        self.scale = scale
        super().__init__(backbone, **kwargs)

    def scale_for(self, num_classes: int) -> float:
        """The cosine scale for ``num_classes`` classes."""
        if self.scale is not None:
            return self.scale
        return 2.0 if num_classes <= 200 else 10.0

    def make_classifier(self, num_classes: int) -> nn.Module:
        return CosineClassifier(cast(int, self.backbone.embedding_dim), num_classes, self.scale_for(num_classes))

    def init_episode_head(self, support: Tensor, support_y: Tensor, ways: int) -> Head:
        onehot = F.one_hot(support_y, ways).to(support.dtype)
        return [onehot.transpose(1, 2) @ F.normalize(support, dim=-1)]

    def episode_head_logits(self, head: Head, z: Tensor) -> Tensor:
        (weight,) = head
        scale = self.scale_for(weight.shape[1])
        return scale * F.normalize(z, dim=-1) @ F.normalize(weight, dim=-1).transpose(1, 2)


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


__all__ = ["RFS", "Baseline", "BaselinePlusPlus", "CosineClassifier", "PretrainedModule"]
