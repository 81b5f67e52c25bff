"""Aggregate: a learner that combines trained few-shot learners with weights it learns on tasks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal, NamedTuple, cast

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from datamodules.episodes import EpisodeBatch, as_episode_batch, episode_ways

from ..bases.episodic import EpisodeOutput, EpisodicModule, at_least_float32
from ..checkpoints import load_checkpoint
from ..metrics import episode_accuracy

#: The per-member statistics the ``episode`` weighting reads, in this order.
STATISTICS = ("support_loss", "support_entropy", "query_entropy")


class Combined(NamedTuple):
    """One batch seen by an :class:`Aggregate`.

    Attributes:
        log_probs: ``[B, M, N*Q, N]`` each member's query class log-probabilities.
        weights: ``[B, M]`` the members' weights for each episode (rows sum to 1).
        member_losses: ``[B, M]`` each member's own loss (its ``episode_loss``).
    """

    log_probs: Tensor
    weights: Tensor
    member_losses: Tensor


def leave_one_out(batch: EpisodeBatch) -> EpisodeBatch:
    """``B * S`` episodes from ``B`` with ``S`` support items: item ``j`` is the query of the other ``S - 1``.

    Task ``b * S + j`` holds task ``b``'s support set without item ``j`` and item ``j`` as its only query.
    """
    tasks, size = batch.support_y.shape[:2]
    others = torch.arange(size, device=batch.support_y.device).expand(size, size)
    keep = others[~torch.eye(size, dtype=torch.bool, device=others.device)].view(size, size - 1)

    def regroup(x: Tensor) -> Tensor:
        return x.flatten(0, 1)

    return EpisodeBatch(
        regroup(batch.support_x[:, keep]),
        regroup(batch.support_y[:, keep]),
        regroup(batch.support_x.unsqueeze(2)),
        regroup(batch.support_y.unsqueeze(2)),
    )


def mean_entropy(log_probs: Tensor) -> Tensor:
    """``[B]`` mean entropy of the categorical distributions ``[B, items, N]`` given by their log-probabilities."""
    return -(log_probs.exp() * log_probs).sum(-1).mean(-1)


class Aggregate(EpisodicModule):
    """A mother learner that combines member learners: ``O = sum_i w_i * log p_i(y | x, support)``.

    Each member (any :class:`~lightning_meta.bases.episodic.EpisodicModule`: ProtoNet, MatchingNet, MAML, ...,
    loaded from ``checkpoints`` or built from config in ``members``) predicts every episode's
    queries; its class log-probabilities ``log_softmax(member.episode_outputs(batch).predictions)``
    are summed with weights ``w`` (a softmax over members, so they sum to 1), and the loss is the
    cross-entropy of ``softmax(O)``. The weights are learned on training episodes, the idea of a
    learner that learns how much to trust each learner (stacked generalisation, Wolpert 1992;
    mixtures of experts with a gating network, Jacobs, Jordan, Nowlan and Hinton 1991):

    - ``weighting="global"``: one weight per member, ``w = softmax(logits)``.
    - ``weighting="episode"``: weights predicted per episode from what it shows about each member,
      ``w = softmax(logits + g(s_i))`` with a small network ``g`` shared by the members, so the
      aggregate trusts a member more on the tasks where it does well. ``s_i`` are the member's
      :data:`STATISTICS` on the episode: its loss and mean entropy on the support set, and the mean
      entropy of its query predictions (queries are unlabelled at test time, their entropy is not).
      Losses are divided by ``log N`` (the loss of a uniform guess) and squashed by ``log1p``;
      entropies are divided by ``log N``, so the statistics mean the same at every ``N``.

    The support statistics (``statistics``): with ``"leave_one_out"`` each support item is
    predicted from the others (one episode per support item: ``S`` times a member's cost). With
    one shot, removing an item removes its class, so no member (a prototype has nothing to average)
    can predict it; ``"support"`` then predicts the support items from the full support set
    (resubstitution): for prototype and matching members this is how well the embedding separates
    the support classes (each item against the other classes' items), for MAML its support loss
    after adaptation; it says how sure and self-consistent a member is on this episode, not how it
    generalises. ``"auto"`` (default) uses leave-one-out when every class has two shots or more,
    else ``"support"``. Statistics are measured with the members in eval mode and without gradients.

    Members are frozen by default (``requires_grad=False``, kept in eval mode; only the weighting
    learns). With ``train_members=True`` they train jointly: the loss is the aggregate's plus each
    member's own loss (so each stays a learner in its own right; MAML's per-task backward detaches
    its predictions, so its gradient comes from its own loss). All members see the same batch: they
    share the datamodule's ways and shots (``setup`` checks heads with fixed outputs, e.g. MAML's).

    Logged beside the aggregate's ``{stage}/acc``: ``{stage}/acc_member_<i>_<name>`` (each member
    alone on the same episodes) and ``{stage}/weight_<i>`` (mean weight over the episodes).

    Args:
        members: members built from config (``class_path`` entries), e.g. ProtoNet, MatchingNet, MAML.
        checkpoints: paths of members' checkpoints (loaded with
            :func:`~lightning_meta.checkpoints.load_checkpoint`); they come first, then ``members``.
        weighting: "global" or "episode", see above.
        statistics: support statistics for "episode": "auto", "leave_one_out" or "support".
        hidden: width of the hidden layer of the episode weighting network.
        train_members: train the members jointly instead of freezing them.
        member_lr: learning rate of the members' parameters with ``train_members`` (default the
            optimizer's).
        optimizer: optimizer factory (Adam); the weights need a larger learning rate than networks
            (the shipped configs use 0.01).
        lr_scheduler: optional scheduler factory, stepped once per epoch.
    """

    def __init__(
        self,
        members: list[EpisodicModule] | None = None,
        checkpoints: list[str] | None = None,
        weighting: Literal["global", "episode"] = "global",
        statistics: Literal["auto", "leave_one_out", "support"] = "auto",
        hidden: int = 16,
        train_members: bool = False,
        member_lr: float | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if weighting not in ("global", "episode"):
            raise ValueError(f"weighting={weighting!r} must be 'global' or 'episode'")
        if statistics not in ("auto", "leave_one_out", "support"):
            raise ValueError(f"statistics={statistics!r} must be 'auto', 'leave_one_out' or 'support'")
        if hidden < 1:
            raise ValueError(f"hidden={hidden} must be a whole number of 1 or more")
        if member_lr is not None and member_lr <= 0:
            raise ValueError(f"member_lr={member_lr} must be positive, or None for the optimizer's learning rate")
        loaded = [load_member(path) for path in checkpoints or []]
        given = list(members or [])
        for i, member in enumerate(given):
            if not isinstance(member, EpisodicModule):
                raise ValueError(
                    f"members[{i}] is a {type(member).__name__}, not an EpisodicModule; give class_path entries "
                    "such as {class_path: ProtoNet}, or the member's checkpoint in checkpoints:"
                )
        if not loaded and not given:
            raise ValueError(
                "Aggregate needs at least one member: give checkpoints: [path.ckpt, ...] or members: "
                "[{class_path: ProtoNet}, ...]"
            )
        # Rebound to a module, so the base's save_hyperparameters leaves live members out of hparams
        # (the checkpoint's state dict holds their weights); under the CLI hparams keep their config.
        held = nn.ModuleList([*loaded, *given])
        members = cast(Any, held)
        # The members are the base's `backbone`: its slot for the networks (and the first convolution
        # that predict_folders reads the image format from).
        super().__init__(held, optimizer, lr_scheduler)
        self.weighting, self.statistics, self.train_members = weighting, statistics, train_members
        self.member_lr = member_lr
        self.needs_grad_in_eval = any(m.needs_grad_in_eval for m in self.members)
        count = len(self.members)
        self.weight_logits = nn.Parameter(torch.zeros(count))
        self.scorer: nn.Sequential | None = None
        if weighting == "episode":
            last = nn.Linear(hidden, 1)
            # Starts as the global weighting (uniform): the statistics earn their influence.
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.scorer = nn.Sequential(nn.Linear(len(STATISTICS), hidden), nn.ReLU(), last)
        # What each member's parameters required before freezing: gradient members adapt those at eval.
        self._adapts = [[p.requires_grad for p in m.parameters()] for m in self.members]
        if not train_members:
            self.members.requires_grad_(False)
            self.members.eval()
        self.member_names = [type(m).__name__.lower() for m in self.members]
        for stage in ("val", "test"):
            for i in range(count):
                self.metrics[f"{stage}_weight_{i}"] = MeanMetric()
                self.metrics[f"{stage}_acc_member_{i}"] = MeanMetric()
        self._last: Combined | None = None

    @property
    def members(self) -> nn.ModuleList:
        """The member learners, in order: those from ``checkpoints``, then those from ``members``."""
        return cast(nn.ModuleList, self.backbone)

    def train(self, mode: bool = True) -> Aggregate:
        """Set the training mode; frozen members stay in eval mode (their batch norm statistics fixed)."""
        super().train(mode)
        if not self.train_members:
            for member in self.members:
                member.eval()
        return self

    # ------------------------------------------------------------------ members
    @contextmanager
    def _calling(self, index: int, statistics: bool) -> Iterator[None]:
        """Run member ``index``: without gradients when frozen or measuring statistics, eval mode for the latter."""
        member = cast(EpisodicModule, self.members[index])
        frozen = not self.train_members
        was_training = member.training
        curve = getattr(member, "adaptation_curve", None)
        params = list(member.parameters())
        # The inner loop adapts the parameters that require grad (select_params): a frozen MAML would
        # otherwise not adapt at all. No gradient reaches them (no_grad), so nothing changes.
        thaw = frozen and member.needs_grad_in_eval
        try:
            if statistics:
                member.eval()
            if curve is not None:  # query losses along the inner loop: not used here, and costly
                setattr(member, "adaptation_curve", False)  # noqa: B010
            if thaw:
                for p, adapts in zip(params, self._adapts[index], strict=True):
                    p.requires_grad_(adapts)
            with torch.no_grad() if frozen or statistics else nullcontext():
                yield
        except ValueError as err:
            raise ValueError(f"Aggregate member {index} ({type(member).__name__}): {err}") from err
        finally:
            if thaw:
                for p in params:
                    p.requires_grad_(False)
            if curve is not None:
                setattr(member, "adaptation_curve", curve)  # noqa: B010
            member.train(was_training)

    def member_outputs(self, index: int, batch: EpisodeBatch, statistics: bool = False) -> EpisodeOutput:
        """Member ``index``'s output on ``batch`` as the aggregate runs it (see :meth:`_calling`)."""
        with self._calling(index, statistics):
            return cast(EpisodicModule, self.members[index]).episode_outputs(batch)

    def support_statistics(self, index: int, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """``[B]`` loss and mean entropy of member ``index`` on the support set (the class docstring says how)."""
        mode = self.statistics
        if mode == "auto":
            mode = "leave_one_out" if int(batch.support_y[0].bincount().min()) >= 2 else "support"
        if mode == "support":
            out = self.member_outputs(index, batch._replace(query_x=batch.support_x, query_y=batch.support_y), True)
            return out.loss, mean_entropy(at_least_float32(out.predictions).log_softmax(-1))
        out = self.member_outputs(index, leave_one_out(batch), True)
        tasks = batch.num_tasks
        entropy = mean_entropy(at_least_float32(out.predictions).log_softmax(-1))
        return out.loss.view(tasks, -1).mean(1), entropy.view(tasks, -1).mean(1)

    # ------------------------------------------------------------------ weights
    def episode_weights(self, statistics: Tensor | None = None) -> Tensor:
        """The members' weights ``[B, M]`` from their statistics ``[B, M, 3]`` (``[1, M]`` without them).

        ``global``: ``softmax(logits)``; ``episode``: ``softmax(logits + g(statistics))``.
        """
        logits = self.weight_logits.unsqueeze(0)
        if self.scorer is not None and statistics is not None:
            logits = logits + self.scorer(statistics).squeeze(-1)
        return logits.float().softmax(-1)

    def episode_statistics(self, batch: EpisodeBatch, log_probs: Tensor) -> Tensor:
        """``[B, M, 3]`` the :data:`STATISTICS` of each member on each episode, normalised by ``log N``."""
        scale = math.log(log_probs.shape[-1]) if log_probs.shape[-1] > 1 else 1.0
        found = []
        for i in range(len(self.members)):
            loss, entropy = self.support_statistics(i, batch)
            found.append(torch.stack([loss, entropy, mean_entropy(log_probs[:, i].detach())], -1))
        values = at_least_float32(torch.stack(found, 1))
        return torch.cat([torch.log1p(values[..., :1] / scale), values[..., 1:] / scale], -1)

    def combine(self, batch: EpisodeBatch) -> Combined:
        """Every member's query log-probabilities on ``batch``, its loss, and the weights of this batch."""
        if batch.query_y.is_floating_point():
            raise ValueError(
                "Aggregate combines class log-probabilities: it needs classification episodes (integer labels), "
                "not regression targets"
            )
        self.check_members(episode_ways(batch))
        outputs = [self.member_outputs(i, batch) for i in range(len(self.members))]
        log_probs = torch.stack([at_least_float32(out.predictions).log_softmax(-1) for out in outputs], 1)
        losses = torch.stack([out.loss for out in outputs], 1)
        statistics = self.episode_statistics(batch, log_probs) if self.scorer is not None else None
        weights = self.episode_weights(statistics).expand(batch.num_tasks, -1)
        return Combined(log_probs, weights, losses)

    # ------------------------------------------------------------------ the algorithm's part
    def check_members(self, ways: int) -> None:
        """Raise ValueError naming the first member with a fixed number of outputs (MAML's head) other than ``ways``."""
        for i, member in enumerate(self.members):
            outputs = getattr(member, "head_outputs", None)
            if isinstance(outputs, int) and outputs != ways:
                raise ValueError(
                    f"Aggregate member {i} ({type(member).__name__}) has a head of {outputs} outputs but these "
                    f"episodes are {ways}-way; all members see the same episodes, so set the datamodule's ways to "
                    f"{outputs}, or use a member built or trained for {ways} ways"
                )

    def episode_loss(self, batch: EpisodeBatch) -> EpisodeOutput:
        combined = self._last = self.combine(batch)
        logits = torch.einsum("bm,bmqn->bqn", combined.weights, combined.log_probs)
        return EpisodeOutput(self.query_loss(logits, batch.query_y), logits)

    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        return self.episode_loss(batch).predictions

    # ------------------------------------------------------------------ logging what aggregation bought
    def _log_members(self, batch: Any, stage: str) -> Combined:
        """Log each member's weight (and, in validation and test, its accuracy alone) on the last batch."""
        combined = self._last
        assert combined is not None, "episode_loss runs before the members are logged"
        episodes = as_episode_batch(batch)
        tasks = episodes.num_tasks
        for i, name in enumerate(self.member_names):
            weight = combined.weights[:, i].detach()
            if stage == "train":  # per step, as the base logs train/loss
                self.log(f"train/weight_{i}", weight.mean(), batch_size=tasks)
                continue
            found = {
                f"{stage}/weight_{i}": (f"{stage}_weight_{i}", weight),
                f"{stage}/acc_member_{i}_{name}": (
                    f"{stage}_acc_member_{i}",
                    episode_accuracy(combined.log_probs[:, i], episodes.query_y),
                ),
            }
            for key, (metric_name, value) in found.items():
                metric = cast(Metric, self.metrics[metric_name])
                metric.update(value)
                self.log(key, metric, batch_size=tasks)
        return combined

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        combined = self._log_members(batch, "train")
        if self.train_members:
            loss = loss + combined.member_losses.mean(0).sum()
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        result = super().validation_step(batch, batch_idx)
        self._log_members(batch, "val")
        return result

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        result = super().test_step(batch, batch_idx)
        self._log_members(batch, "test")
        return result

    # ------------------------------------------------------------------ checks and the optimizer
    def configure_optimizers(self) -> Any:
        own = [p for name, p in self.named_parameters() if not name.startswith("backbone.") and p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": own}]
        trained = [p for p in self.members.parameters() if p.requires_grad]
        if trained:
            groups.append({"params": trained, **({} if self.member_lr is None else {"lr": self.member_lr})})
        factory = self.optimizer_factory
        self.optimizer_factory = lambda _: factory(groups)  # the base builds the scheduler around it
        try:
            return super().configure_optimizers()
        finally:
            self.optimizer_factory = factory


def load_member(path: str) -> EpisodicModule:
    """A member from its checkpoint (:func:`~lightning_meta.checkpoints.load_checkpoint`), in eval mode."""
    member = load_checkpoint(path)
    if not isinstance(member, EpisodicModule):
        raise ValueError(f"checkpoints: {path} holds a {type(member).__name__}, not a few-shot classifier to aggregate")
    return member
