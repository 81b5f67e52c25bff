"""PretrainedModule: the base of the pre-train + fine-tune baselines (Baseline, Baseline++, RFS).

Each is trained as an ordinary classifier over all training classes on labelled batches
(``train_batches="labelled"`` of the datamodule) and evaluated on the same fixed validation and
test episodes as every other module, by fitting a new head on each episode's support
embeddings; with ``finetune_backbone`` the whole backbone is fine-tuned per episode too
(P>M>F, Hu et al. 2022).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call

from datamodules.base import LabelledBatch
from datamodules.episodes import EpisodeBatch, as_episode_batch, episode_ways

from ..arguments import check_number, check_whole
from ..backbones import Conv4
from ..functional import inner_loop
from ..inner_optimizers import Momentum
from ..memory_format import channels_last_argument
from ..precision import solver_precision
from .episodic import EpisodicModule, at_least_float32, embed_episode

#: An episode head: its tensors with a leading task dimension (weights ``[B, N, D]``, bias ``[B, N]``).
Head = list[Tensor]


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
        owner = type(self).__name__
        check_whole(owner, head_steps=head_steps, **({} if num_classes is None else {"num_classes": num_classes}))
        check_whole(owner, 0, finetune_steps=finetune_steps)
        check_number(owner, zero_ok=True, head_lr=head_lr, finetune_lr=finetune_lr)
        super().__init__(backbone, optimizer, lr_scheduler)
        self.num_classes, self.head_steps, self.head_lr = num_classes, head_steps, head_lr
        self.finetune_backbone, self.finetune_steps, self.finetune_lr = finetune_backbone, finetune_steps, finetune_lr
        self.wants_channels_last = channels_last_argument(type(self).__name__, channels_last, True)
        self.classifier: nn.Module | None = None
        if num_classes is not None:
            self._build_classifier(num_classes)

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
