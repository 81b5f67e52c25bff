"""Meta Networks (Munkhdalai and Yu 2017)."""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from datamodules.episodes import EpisodeBatch, episode_ways

from ..arguments import check_choice, check_number, check_whole
from ..backbones import Conv4
from ..bases.episodic import EpisodeOutput, EpisodicModule, at_least_float32, embed_episode
from ..memory_format import channels_last_argument


def layer_augmented(h: Tensor, slow: Tensor, fast: Tensor | None, activation: bool) -> Tensor:
    """One layer-augmented layer (section 3.3, Figure 2): ``f(h W^T) + f(h W*^T)``.

    The slow weights ``slow`` (``[out, in]``) and the fast weights ``fast`` (``[..., out, in]``, one
    matrix per row of ``h``: ``h`` is ``[..., in]``) each go through the layer and its nonlinearity
    ``f`` (ReLU, or the identity for ``activation=False``), and the two outputs are added. With
    ``fast=None`` (or zero fast weights) the layer is the slow network's.
    """
    f = F.relu if activation else (lambda x: x)
    out = f(F.linear(h, slow))
    if fast is None:
        return out
    return out + f(torch.einsum("...oi,...i->...o", fast.to(h.dtype), h))


def read_memory(keys: Tensor, values: Tensor, queries: Tensor, scale: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
    """Soft attention over the memory (eq. 8-9): ``a = softmax(scale * cos(r, R))``, read ``a^T M``.

    Args:
        keys: ``[B, N, H]`` memory index ``R`` (the support representations ``r'_i``).
        values: ``[B, N, P]`` memory ``M`` (the support examples' fast weights ``W*_i``, flattened).
        queries: ``[B, Q, H]`` query representations ``r_i``.
        scale: multiplies the cosine similarities before the softmax (1 in the paper).

    Returns:
        The attention weights ``[B, Q, N]`` (each row sums to 1) and the read values ``[B, Q, P]``.
    """
    cosine = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).transpose(1, 2)
    weights = torch.softmax(scale * cosine, dim=-1)
    return weights, weights @ values.to(weights.dtype)


def log_and_sign(gradient: Tensor, k: float = 7.0) -> Tensor:
    """Gradient preprocessing of Andrychowicz et al. (2016, section 3.2), as the MetaNet code does: ``[..., 2]``.

    Each coordinate becomes ``(max(log|g| / k, -1), clamp(e^k g, -1, 1))``: ``(log|g| / k, sign(g))``
    for ``|g| >= e^-k`` and ``(-1, e^k g)`` below, so the fast weight generators see gradients of
    every magnitude on one scale.
    """
    g = at_least_float32(gradient)
    magnitude = (g.abs().clamp_min(torch.finfo(g.dtype).tiny).log() / k).clamp_min(-1.0)
    sign = (g * math.exp(k)).clamp(-1.0, 1.0)
    return torch.stack([magnitude, sign], dim=-1)


EmbeddingLoss = Literal["cross_entropy", "contrastive"]


class MetaNetwork(EpisodicModule):
    """Meta Networks: fast weights from loss gradients, stored per support example and read by attention.

    Munkhdalai and Yu, "Meta Networks", ICML 2017, section 3 and Algorithm 1. Two learners:

    - the *meta learner*: a dynamic representation function ``u`` (``representation`` backbone and a
      layer-augmented linear layer, slow weights ``Q``) whose task-level fast weights
      ``Q* = d(G, {grad_Q L_i})`` (eq. 2-4) come from the gradients of the representation loss
      ``loss_emb`` on the support set, summarised by an LSTM ``d``; and ``m``, a network that turns
      the base learner's loss gradient on each support example into that example's fast weights
      ``W*_i = m(Z, grad_W L_i)`` (eq. 1, 10-11);
    - the *base learner* ``b``: ``backbone`` and a layer-augmented two-layer classifier (slow
      weights ``W``), which predicts each query with the fast weights it reads from the memory.

    The memory holds ``M = {W*_i}`` keyed by ``R = {r'_i = u(Q, Q*, x'_i)}`` (eq. 5); a query reads
    ``softmax(cos(r, R))^T M`` (eq. 8-9) and is classified by ``b(W, W*, x)`` (eq. 12), where each
    layer adds the slow and fast weights' outputs (layer augmentation, section 3.3). ``m`` and ``d``
    work coordinate-wise on preprocessed gradients (:func:`log_and_sign`), as in the authors' code:
    ``m`` an MLP 2-20-20-1, ``d`` an LSTM with 20 units and a linear output.

    ``loss_emb`` is the cross-entropy of ``u``'s own classifier on the support labels (the paper's
    choice when the support set has one example per class), or the contrastive loss on support
    pairs with the auxiliary same-class label (eq. 6-7, Chopra et al. 2005; the paper's choice
    for several examples per class, section 3.1).
    ``d`` reads one gradient per class (the class's examples, or its pairs), in class order, so the
    predictions do not depend on the order of the support set (the paper samples ``T`` examples).
    The meta information is an input: gradients are not differentiated through (as in the authors'
    code). The training loss is the query loss (Algorithm 1) plus ``embedding_loss_weight`` times
    ``loss_emb``; validation and test report the query loss.

    Differences from the paper: the backbones keep slow weights only and the fast weights augment
    the linear layers on top of them (the paper's Omniglot network fast-parameterises all five
    convolutions as well), which keeps any backbone usable; ``attention_scale`` sharpens the
    cosine attention (1 is the paper's).

    Args:
        ways: classes per episode; the base learner and ``u``'s classifier have this many outputs.
        backbone: the base learner's feature network; default ``Conv4()`` (Omniglot, 28 px).
        representation: ``u``'s feature network; default a fresh copy of ``backbone``.
        hidden: width of the layer-augmented layers (the base learner's hidden layer and ``u``'s
            representation).
        embedding_dim: the backbones' output size; default ``backbone.embedding_dim``.
        embedding_loss: ``loss_emb``: "cross_entropy" (the paper's for one shot) or "contrastive"
            (the paper's for several shots; needs two or more shots).
        embedding_loss_weight: weight of ``loss_emb`` in the training loss (0: the query loss only).
        contrastive_margin: margin of the contrastive loss on the representation distance.
        attention_scale: multiplies the cosine similarities of the memory read.
        meta_hidden: hidden units of ``m`` and ``d`` (20 in the authors' code).
        channels_last: deprecated; this module asks the Trainer for the
            :class:`~lightning_meta.memory_format.ChannelsLast` callback (False here turns that off).
        optimizer: outer optimizer factory (Adam, lr 1e-3 as in the authors' code).
        lr_scheduler: optional scheduler factory.
    """

    needs_grad_in_eval = True

    def __init__(
        self,
        ways: int,
        backbone: nn.Module | None = None,
        representation: nn.Module | None = None,
        hidden: int = 64,
        embedding_dim: int | None = None,
        embedding_loss: EmbeddingLoss = "cross_entropy",
        embedding_loss_weight: float = 1.0,
        contrastive_margin: float = 1.0,
        attention_scale: float = 1.0,
        meta_hidden: int = 20,
        channels_last: bool | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        check_whole("MetaNetwork", ways=ways, hidden=hidden, meta_hidden=meta_hidden)
        check_choice("MetaNetwork", "embedding_loss", embedding_loss, EmbeddingLoss)
        check_number("MetaNetwork", zero_ok=True, embedding_loss_weight=embedding_loss_weight,
                     contrastive_margin=contrastive_margin, attention_scale=attention_scale)  # fmt: skip
        backbone = backbone if backbone is not None else Conv4()
        dim = embedding_dim or getattr(backbone, "embedding_dim", None)
        if not dim:
            raise ValueError("embedding_dim= is needed: the backbone has no embedding_dim attribute (its output size)")
        super().__init__(backbone, optimizer, lr_scheduler)
        self.representation = representation if representation is not None else copy.deepcopy(backbone)
        self.ways, self.embedding_loss, self.embedding_loss_weight = ways, embedding_loss, embedding_loss_weight
        self.contrastive_margin, self.attention_scale = contrastive_margin, attention_scale
        # Slow weights without biases, as in the authors' code: fast weights augment weight matrices.
        self.base_hidden = nn.Linear(dim, hidden, bias=False)  # W, layer 1
        self.base_out = nn.Linear(hidden, ways, bias=False)  # W, layer 2
        self.key = nn.Linear(dim, hidden, bias=False)  # Q
        # u's classifier for the cross-entropy loss_emb (absent for the contrastive loss, which needs none).
        self.embedding_head = nn.Linear(hidden, ways, bias=False) if embedding_loss == "cross_entropy" else None
        if self.embedding_head is not None and not embedding_loss_weight:
            # Trained by nothing then (gradients are not differentiated through): a fixed random
            # classifier, as in the authors' code, and no unused parameter for DDP.
            self.embedding_head.weight.requires_grad_(False)
        # m (parameters Z): coordinate-wise MLP from a preprocessed gradient to a fast weight.
        self.m = nn.Sequential(
            nn.Linear(2, meta_hidden), nn.ReLU(), nn.Linear(meta_hidden, meta_hidden), nn.ReLU(),
            nn.Linear(meta_hidden, 1),
        )  # fmt: skip
        # d (parameters G): coordinate-wise LSTM over the T gradients of loss_emb.
        self.d = nn.LSTM(2, meta_hidden, batch_first=True)
        self.d_out = nn.Linear(meta_hidden, 1)
        self.wants_channels_last = channels_last_argument("MetaNetwork", channels_last, True)

    # ------------------------------------------------------------------ pieces
    def check_episode_ways(self, batch: EpisodeBatch) -> None:
        """Raise ValueError when the episodes have other ways than the model's ``ways``."""
        if batch.support_y.is_floating_point():
            raise ValueError("MetaNetwork classifies: support_y must hold integer class labels, not regression targets")
        ways = episode_ways(batch)
        if ways != self.ways:
            raise ValueError(
                f"ways={self.ways} but these episodes are {ways}-way; set the model's ways to "
                f"{ways} or the datamodule's ways to {self.ways}"
            )

    def generate(self, gradient: Tensor, network: Literal["m", "d"]) -> Tensor:
        """Fast weights from gradients, coordinate-wise (each weight from its own gradient coordinates).

        ``m`` maps ``[..., *shape]`` to the same shape; ``d`` reads ``[B, T, *shape]`` as a sequence
        over ``T`` and returns ``[B, *shape]``.
        """
        features = log_and_sign(gradient.detach())
        if network == "m":
            return self.m(features).squeeze(-1)
        tasks, steps, shape = gradient.shape[0], gradient.shape[1], gradient.shape[2:]
        sequence = features.reshape(tasks, steps, -1, 2).transpose(1, 2).reshape(-1, steps, 2)
        out, _ = self.d(sequence)
        return self.d_out(out[:, -1]).reshape(tasks, *shape)

    def representation_gradients(self, h: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``loss_emb`` of ``u(Q, x')`` on the support set and its gradients for ``d`` (eq. 2-3, 6-7).

        Returns the mean loss ``[B]`` (differentiable in the slow weights) and ``[B, T, hidden, in]``:
        the gradient with respect to ``Q`` of step ``t``'s loss, which is the loss of the support
        examples of class ``t`` (cross-entropy) or of the pairs that start at them (contrastive).
        """
        with torch.enable_grad():  # gradients are the meta information, in evaluation too
            step_loss, copies = self._step_losses(h, labels)
            (gradient,) = torch.autograd.grad(step_loss.sum(), copies, retain_graph=self.training)
        return step_loss.mean(1), gradient

    def _step_losses(self, h: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        tasks, steps = h.shape[0], self.ways
        # One copy of Q per step (and task): the gradient with respect to the copies is per step.
        copies = self.key.weight.expand(tasks, steps, *self.key.weight.shape)
        r = torch.einsum("btoi,bsi->btso", copies, h.to(copies.dtype))  # r^t_j = Q_t h_j: [B, T, S, H]
        onehot = F.one_hot(labels, steps).to(r.dtype)  # [B, S, T]
        if self.embedding_head is not None:
            logits = at_least_float32(self.embedding_head(r))  # [B, T, S, ways]
            per_example = F.cross_entropy(
                logits.flatten(0, 2), labels.unsqueeze(1).expand(-1, steps, -1).flatten(), reduction="none"
            ).view(tasks, steps, -1)
            step_loss = (per_example * onehot.transpose(1, 2)).sum(-1) / onehot.sum(1)  # [B, T]
        else:
            if int(onehot.sum(1).min()) < 2:
                raise ValueError(
                    "embedding_loss='contrastive' needs two or more shots (same-class support pairs); use "
                    "embedding_loss='cross_entropy' for one shot, as the paper does"
                )
            r = at_least_float32(r)
            distance = (r.unsqueeze(3) - r.unsqueeze(2)).square().sum(-1).clamp_min(1e-12).sqrt()  # [B, T, S, S]
            same = (labels.unsqueeze(2) == labels.unsqueeze(1)).to(r.dtype).unsqueeze(1)  # l_ij of eq. 7
            pair = same * distance.square() + (1 - same) * (self.contrastive_margin - distance).clamp_min(0).square()
            items = labels.shape[1]
            pair = pair * (1 - torch.eye(items, dtype=r.dtype, device=r.device))  # no pair of an item with itself
            starts = onehot.transpose(1, 2).unsqueeze(-1)  # pairs (i, j) with y_i = t: [B, T, S, 1]
            step_loss = (pair * starts).sum((-1, -2)) / (onehot.sum(1) * max(items - 1, 1))
        return step_loss, copies

    def example_gradients(self, h: Tensor, labels: Tensor) -> list[Tensor]:
        """The base learner's loss gradient on each support example (eq. 10-11): ``[B, N, *W.shape]`` per layer."""
        leading = h.shape[:2]
        weights = [w.detach().expand(*leading, *w.shape).clone().requires_grad_() for w in self.slow_base_weights()]
        with torch.enable_grad():
            logits = self.base_forward(h.detach(), [None, None], per_example=weights)
            loss = F.cross_entropy(at_least_float32(logits).flatten(0, 1), labels.flatten(), reduction="sum")
            return list(torch.autograd.grad(loss, weights))

    def slow_base_weights(self) -> list[Tensor]:
        """The base learner's slow weights ``W``, one per layer-augmented layer."""
        return [self.base_hidden.weight, self.base_out.weight]

    def base_forward(self, h: Tensor, fast: list[Tensor | None], per_example: list[Tensor] | None = None) -> Tensor:
        """``b(W, W*, x)`` on features ``h`` ``[B, Q, D]`` with fast weights ``[B, Q, *W.shape]`` per layer (eq. 12).

        ``per_example`` replaces the slow weights by one copy per example (to take per-example gradients).
        """
        if per_example is not None:
            z = F.relu(torch.einsum("bnoi,bni->bno", per_example[0], h.to(per_example[0].dtype)))
            return torch.einsum("bnoi,bni->bno", per_example[1], z)
        z = layer_augmented(h, self.base_hidden.weight, fast[0], activation=True)
        return layer_augmented(z, self.base_out.weight, fast[1], activation=False)

    def memory(self, batch: EpisodeBatch) -> dict[str, Tensor]:
        """Algorithm 1 up to the memory read: fast weights, memory and attention for ``batch``.

        Returns a dict with ``values`` ``[B, N, P]`` (each support example's fast weights ``W*_i``,
        flattened), ``keys`` ``[B, N, H]`` and ``queries`` ``[B, Q, H]`` (representations under
        ``Q*``), ``attention`` ``[B, Q, N]``, ``read`` ``[B, Q, P]`` (each query's fast weights),
        the base learner's query features ``features`` ``[B, Q, D]`` and ``embedding_loss`` ``[B]``.
        """
        self.check_episode_ways(batch)
        support_u, query_u = embed_episode(self.representation, batch)
        support_b, query_b = embed_episode(self.backbone, batch)
        embedding_loss, gradient = self.representation_gradients(support_u, batch.support_y)
        task_fast = self.generate(gradient, "d")  # Q*: [B, H, D]  (eq. 4)
        keys = layer_augmented(support_u, self.key.weight, task_fast.unsqueeze(1), activation=False)  # eq. 5
        queries = layer_augmented(query_u, self.key.weight, task_fast.unsqueeze(1), activation=False)
        values = torch.cat(
            [self.generate(g, "m").flatten(2) for g in self.example_gradients(support_b, batch.support_y)], dim=-1
        )  # W*_i = m(Z, grad_i): [B, N, P]  (eq. 1)
        attention, read = read_memory(keys, values, queries, self.attention_scale)  # eq. 8-9
        return {
            "values": values, "keys": keys, "queries": queries, "attention": attention, "read": read,
            "features": query_b, "embedding_loss": embedding_loss,
        }  # fmt: skip

    def unflatten(self, read: Tensor) -> list[Tensor | None]:
        """Split flattened fast weights ``[B, Q, P]`` into one ``[B, Q, *W.shape]`` tensor per layer."""
        shapes = [w.shape for w in self.slow_base_weights()]
        parts = read.split([s.numel() for s in shapes], dim=-1)
        return [p.reshape(*read.shape[:2], *s) for p, s in zip(parts, shapes, strict=True)]

    # ------------------------------------------------------------------ EpisodicModule
    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        state = self.memory(batch)
        return self.base_forward(state["features"], self.unflatten(state["read"]))

    def episode_loss(self, batch: EpisodeBatch) -> EpisodeOutput:
        state = self.memory(batch)
        logits = self.base_forward(state["features"], self.unflatten(state["read"]))
        loss = self.query_loss(logits, batch.query_y)
        if self.training and self.embedding_loss_weight:
            loss = loss + self.embedding_loss_weight * state["embedding_loss"]
        return EpisodeOutput(loss, logits)
