"""Reference parity at equal budget (issue 22, part 1): our methods against learn2learn's and easyfsl's.

For every method and setting, ours (the LightningModule of the shipped config, trained by a Trainer
on the config's Omniglot datamodule) and theirs (the reference implementation) start from the same
weights (theirs is built from our freshly initialised backbone), use the same hyperparameters and
train on the same episodes in the same order (theirs reads the batches an uninterrupted fit of ours
draws, and the script checks that they are the same), for the same number of meta-batches, in
float32 on one thread. Both are then tested on the config's 1000 fixed test episodes; the ledger
records each one's accuracy with its 95% CI, the paired difference (same episodes) with its 95% CI,
and both wall times.

The references (``REFERENCES``): learn2learn 0.2.0's ``MAML`` (MAML, FOMAML), ``MetaSGD``, its ANIL
recipe (``examples/vision/anil_fc100.py``), ProtoNet recipe (``protonet_miniimagenet.py``, pairwise
distances), ``SVClassifier`` (MetaOptNet, qpth) and Reptile recipe (``reptile_miniimagenet.py``);
easyfsl 1.5.0's ``MatchingNetworks`` and ``Finetune``. The MAML family and Reptile run on
learn2learn's own ``OmniglotCNN`` with our initial weights copied in (its batch norm, not ours).

    python benchmarks/parity.py --methods maml protonet --settings 5w1s --meta_batches 1000 --out /work/runs/parity
    python benchmarks/parity.py --steps 20 --methods maml fomaml metasgd metaoptnet --settings 5w1s --out DIR
    python benchmarks/parity.py --table --out /work/runs/parity          # the markdown table of RESULTS.md

One JSON file per row and mode in ``--out`` (written atomically); a row already there is skipped
unless ``--force``, so a list of rows can be re-run after an interruption.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from datamodules.episodes import EpisodeBatch
from lightning_meta.cli import make_cli
from lightning_meta.metrics import episode_accuracy

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

#: method -> (config path with {s} for the setting, overrides that turn it into the method, reference).
METHODS: dict[str, tuple[str, list[str], str]] = {
    "maml": ("maml/omniglot_{s}.yaml", [], "learn2learn 0.2.0 MAML"),
    "fomaml": (
        "maml/omniglot_{s}.yaml",
        ["--model.init_args.first_order", "true"],
        "learn2learn 0.2.0 MAML(first_order)",
    ),
    "metasgd": ("maml/omniglot_{s}.yaml", ["--model.init_args.learn_inner_lr", "element"], "learn2learn 0.2.0 MetaSGD"),
    "anil": ("anil/omniglot_{s}.yaml", [], "learn2learn 0.2.0 anil_fc100.py recipe"),
    "protonet": ("protonet/omniglot_{s}.yaml", [], "learn2learn 0.2.0 protonet recipe"),
    "metaoptnet": ("metaoptnet/omniglot_{s}.yaml", [], "learn2learn 0.2.0 SVClassifier (qpth)"),
    "reptile": ("reptile/omniglot_{s}.yaml", [], "learn2learn 0.2.0 reptile recipe"),
    "matchingnet": ("matchingnet/omniglot_{s}.yaml", [], "easyfsl 1.5.0 MatchingNetworks (no FCE)"),
    "finetune": ("baselinepp/omniglot_{s}.yaml", [], "easyfsl 1.5.0 Finetune"),
}
#: Settings whose config file is derived from another setting's (no shipped file): the base and its overrides.
DERIVED = {("metaoptnet", "20w1s"): ("5w1s", ["--data.init_args.ways", "20"])}
SHIPPED = {("fomaml", "5w1s"): "maml/fomaml_omniglot_5w1s.yaml"}


# ----------------------------------------------------------------------------- building ours
def config_of(method: str, setting: str) -> tuple[Path, list[str]]:
    """The shipped config of a row and the command-line overrides that make it the method."""
    if (method, setting) in SHIPPED:
        return CONFIGS / SHIPPED[method, setting], []
    pattern, overrides, _ = METHODS[method]
    base, more = DERIVED.get((method, setting), (setting, []))
    return CONFIGS / pattern.format(s=base), [*overrides, *more]


def build(method: str, setting: str, root: str, extra: list[str] | tuple[str, ...] = ()) -> tuple[Any, Any, str]:
    """Our module and datamodule, instantiated from the shipped config by the CLI (its seed, 0, fixes the weights)."""
    path, overrides = config_of(method, setting)
    args = ["--config", str(path), "--data.init_args.root", root, "--trainer.logger", "false"]
    args += ["--trainer.precision", "32-true", *overrides, *extra]
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees our own arguments
    try:
        cli = make_cli(args, run=False)
    finally:
        sys.argv = argv
    command = " ".join([str(path.relative_to(REPO)), *overrides, *extra])
    return cli.model, cli.datamodule, command


def as_float(dm: Any, batch: EpisodeBatch) -> EpisodeBatch:
    """What the datamodule turns a uint8 batch into on the device (Omniglot has no augmentation)."""
    return EpisodeBatch(dm.transform_images(batch.support_x), batch.support_y,
                        dm.transform_images(batch.query_x), batch.query_y)  # fmt: skip


def fingerprint(batch: EpisodeBatch) -> list[float]:
    """Enough of a batch to tell two batches apart: sums of its images and labels, in float64."""
    return [float(t.double().sum()) for t in batch[:4]] + [float(batch.support_x.flatten()[::7].double().sum())]


def train_stream(dm: Any, n: int) -> Iterator[EpisodeBatch]:
    """The first ``n`` training batches an uninterrupted fit draws, in order (epochs of ``len(stream)`` batches)."""
    dm.setup("fit")
    stream = dm.streams["train"]
    per_epoch = len(stream)
    for i in range(n):
        stream.epoch = i // per_epoch
        yield as_float(dm, stream.batch(i % per_epoch))


def test_batches(dm: Any) -> Iterator[EpisodeBatch]:
    """The fixed test episodes of the config, in the batches the Trainer tests them in."""
    dm.setup("test")
    stream = dm.streams["test"]
    for j in range(len(stream)):
        yield as_float(dm, stream.batch(j))


class Recorder(Callback):
    """Records each training step's loss and batch fingerprint, and each test episode's accuracy."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.train_prints: list[list[float]] = []
        self.test_acc: list[float] = []
        self.test_prints: list[list[float]] = []
        self.step_s: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.step_s.append(time.perf_counter() - self._start)
        self.losses.append(float(outputs["loss"]))
        if isinstance(batch, EpisodeBatch):
            self.train_prints.append(fingerprint(batch))

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int, dataloader_idx: int = 0
    ) -> None:
        self.test_acc += episode_accuracy(outputs["output"].predictions, batch.query_y).tolist()
        self.test_prints.append(fingerprint(batch))


def trainer_for(steps: int, recorder: Recorder, precision: str = "32-true") -> pl.Trainer:
    """Float32, CPU, no validation, logging or checkpoints; gradients allowed in test (MAML adapts there)."""
    return pl.Trainer(
        max_steps=steps, max_epochs=-1, precision=precision, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, inference_mode=False, callbacks=[recorder],
    )  # fmt: skip


# ----------------------------------------------------------------------------- the references
class Reference:
    """A reference implementation trained and tested on our episodes; built from our freshly initialised module."""

    #: The training batches are not episodes (pre-training methods): theirs does not train, it reuses ours.
    shares_training = False

    def __init__(self, ours: Any, meta_batches: int, epoch_batches: int) -> None:
        self.meta_batches, self.epoch_batches = meta_batches, epoch_batches

    def outer(self, params: list[Tensor], ours: Any) -> None:
        """Our configured outer optimiser and scheduler (the CLI's factories) over the reference's parameters."""
        self.optimizer = ours.optimizer_factory(params)
        factory = ours.lr_scheduler_factory
        self.scheduler = factory(self.optimizer) if factory is not None else None

    def train_step(self, batch: EpisodeBatch, i: int) -> float:
        """One meta-batch; returns the mean query loss of its tasks (as our ``train/loss``)."""
        raise NotImplementedError

    def end_of_batch(self, i: int) -> None:
        """After meta-batch ``i`` (0-based): step the per-epoch scheduler at the end of each epoch, as the Trainer."""
        if self.scheduler is not None and (i + 1) % self.epoch_batches == 0:
            self.scheduler.step()

    def predict(self, batch: EpisodeBatch) -> Tensor:
        """``[B, N*Q, N]`` query logits of a test batch."""
        raise NotImplementedError


def l2l_network(ours_net: nn.Module) -> nn.Module:
    """learn2learn's OmniglotCNN with our Conv4's weights (stride-2 Conv4 with a head), else a copy of ours."""
    import learn2learn as l2l

    features, head = getattr(ours_net, "features", None), getattr(ours_net, "head", None)
    if getattr(ours_net, "pooling", None) != "stride" or head is None or features is None:
        return copy.deepcopy(ours_net)
    net = l2l.vision.models.OmniglotCNN(output_size=head.out_features, hidden_size=head.in_features)
    with torch.no_grad():
        for i in range(4):
            conv, norm = features[3 * i], features[3 * i + 1]
            block = net.base[i]
            block.conv.weight.copy_(conv.weight)
            block.conv.bias.copy_(conv.bias)
            block.normalize.weight.copy_(norm.weight)
            block.normalize.bias.copy_(norm.bias)
        net.classifier.weight.copy_(head.weight)
        net.classifier.bias.copy_(head.bias)
    return net.train()  # batch statistics always, as learn2learn's examples (they never call eval())


class L2LMAML(Reference):
    """learn2learn's ``MAML`` / ``MetaSGD``: clone, ``adapt`` per inner step, per-task ``backward`` of loss / tasks."""

    def __init__(self, ours: Any, meta_batches: int, epoch_batches: int) -> None:
        import learn2learn as l2l

        super().__init__(ours, meta_batches, epoch_batches)
        if ours.inner_lrs is not None:
            if ours.inner_optimizer.per != "element":
                raise ValueError("learn2learn's MetaSGD learns one step size per element: use learn_inner_lr='element'")
            # A copy of our Conv4, not OmniglotCNN: OmniglotCNN holds its conv blocks twice (`base` and
            # `features.1`), and MetaSGD's update (unlike MAML's) does not keep shared modules shared, so from
            # the second inner step on the forward pass no longer uses the adapted weights (autograd error).
            net = copy.deepcopy(ours.network)
            self.meta: nn.Module = l2l.algorithms.MetaSGD(net, lr=ours.inner_optimizer.lr, first_order=ours.first_order)
            with torch.no_grad():  # our (learned) step sizes, in the network's parameter order
                for lr, (name, _) in zip(self.meta.lrs, ours.network.named_parameters(), strict=True):
                    lr.copy_(ours.inner_lrs[name.replace(".", "/")])
        else:
            self.meta = l2l.algorithms.MAML(l2l_network(ours.network), lr=ours.inner_lr, first_order=ours.first_order)
        self.steps, self.steps_eval = ours.inner_steps, ours.inner_steps_eval
        self.outer(list(self.meta.parameters()), ours)

    def adapted(self, support_x: Tensor, support_y: Tensor, steps: int, first_order: bool | None) -> nn.Module:
        learner = self.meta.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(support_x), support_y), first_order=first_order)
        return learner

    def train_step(self, batch: EpisodeBatch, i: int) -> float:
        self.optimizer.zero_grad()
        tasks, total = batch.num_tasks, 0.0
        for t in range(tasks):
            learner = self.adapted(batch.support_x[t], batch.support_y[t], self.steps, None)
            loss = F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t])
            (loss / tasks).backward()
            total += loss.item()
        self.optimizer.step()
        return total / tasks

    def predict(self, batch: EpisodeBatch) -> Tensor:
        out = []
        for t in range(batch.num_tasks):
            learner = self.adapted(batch.support_x[t], batch.support_y[t], self.steps_eval, None)
            with torch.no_grad():
                out.append(learner(batch.query_x[t]))
        return torch.stack(out)


class L2LANIL(Reference):
    """learn2learn's ANIL recipe (``anil_fc100.py``): the body as a plain module, the head in ``l2l.algorithms.MAML``,
    per task: embed, clone the head, ``adapt`` it on the support features, ``backward`` of the query loss; the
    gradients averaged over the tasks. Support and query go through the body as our ``body_batching`` says
    (the recipe embeds them together, our ``"task"``; MAML and Raghu et al. embed them apart, our ``"sets"``)."""

    def __init__(self, ours: Any, meta_batches: int, epoch_batches: int) -> None:
        import learn2learn as l2l

        super().__init__(ours, meta_batches, epoch_batches)
        self.features = copy.deepcopy(ours.backbone)
        self.head = l2l.algorithms.MAML(copy.deepcopy(ours.head), lr=ours.inner_lr, first_order=ours.first_order)
        self.steps, self.steps_eval, self.body_batching = ours.inner_steps, ours.inner_steps_eval, ours.body_batching
        if self.body_batching == "flat":
            raise ValueError("the ANIL recipe reference embeds per task: use body_batching 'sets' or 'task'")
        self.outer([*self.features.parameters(), *self.head.parameters()], ours)

    def embed(self, batch: EpisodeBatch, t: int) -> tuple[Tensor, Tensor]:
        if self.body_batching == "sets":
            return self.features(batch.support_x[t]), self.features(batch.query_x[t])
        z = self.features(torch.cat([batch.support_x[t], batch.query_x[t]]))
        return z[: batch.support_x.shape[1]], z[batch.support_x.shape[1] :]

    def task(self, batch: EpisodeBatch, t: int, steps: int) -> Tensor:
        support, query = self.embed(batch, t)
        learner = self.head.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(support), batch.support_y[t]))
        return learner(query)

    def train_step(self, batch: EpisodeBatch, i: int) -> float:
        self.optimizer.zero_grad()
        total = 0.0
        for t in range(batch.num_tasks):
            loss = F.cross_entropy(self.task(batch, t, self.steps), batch.query_y[t])
            loss.backward()
            total += loss.item()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(1.0 / batch.num_tasks)
        self.optimizer.step()
        return total / batch.num_tasks

    def predict(self, batch: EpisodeBatch) -> Tensor:
        return torch.stack([self.task(batch, t, self.steps_eval).detach() for t in range(batch.num_tasks)])


class MetricReference(Reference):
    """A reference trained end to end on the query loss of ``batch_logits``: train mode to train, eval mode to test."""

    model: nn.Module

    @staticmethod
    def loss(logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target)

    def logits(self, batch: EpisodeBatch, t: int) -> Tensor:
        """Task ``t``'s query logits (the default ``batch_logits`` calls it per task)."""
        raise NotImplementedError

    def batch_logits(self, batch: EpisodeBatch, training: bool) -> Tensor:
        """``[B, N*Q, N]`` query logits of a meta-batch, in training or at test."""
        return torch.stack([self.logits(batch, t) for t in range(batch.num_tasks)])

    def batch_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The mean of the tasks' query losses."""
        return torch.stack([self.loss(lg, y) for lg, y in zip(logits, target, strict=True)]).mean()

    def train_step(self, batch: EpisodeBatch, i: int) -> float:
        self.model.train()
        self.optimizer.zero_grad()
        loss = self.batch_loss(self.batch_logits(batch, True), batch.query_y)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def predict(self, batch: EpisodeBatch) -> Tensor:
        self.model.eval()
        with torch.no_grad():
            return self.batch_logits(batch, False)


class L2LProtoNet(MetricReference):
    """learn2learn's ProtoNet recipe: one pass over support and query, class means, negative squared distances."""

    def __init__(self, ours: Any, meta_batches: int, epoch_batches: int) -> None:
        super().__init__(ours, meta_batches, epoch_batches)
        self.model = copy.deepcopy(ours.backbone)
        self.outer(list(self.model.parameters()), ours)

    @staticmethod
    def pairwise_distances_logits(a: Tensor, b: Tensor) -> Tensor:
        n, m = a.shape[0], b.shape[0]
        return -((a.unsqueeze(1).expand(n, m, -1) - b.unsqueeze(0).expand(n, m, -1)) ** 2).sum(dim=2)

    def logits(self, batch: EpisodeBatch, t: int) -> Tensor:
        support_x, support_y = batch.support_x[t], batch.support_y[t]
        ways = int(support_y.max()) + 1
        embeddings = self.model(torch.cat([support_x, batch.query_x[t]]))
        support = embeddings[: len(support_y)].reshape(ways, len(support_y) // ways, -1).mean(dim=1)
        return self.pairwise_distances_logits(embeddings[len(support_y) :], support)


class L2LMetaOptNet(MetricReference):
    """learn2learn's ``SVClassifier`` (qpth's QP solver) per task, times a learned scale as in Lee et al.'s code.

    The meta-batch is embedded in one pass, as ours does, and the QP is solved in our ``solver_dtype``
    (float64 as shipped), so what differs is the SVM solver and its gradient.
    """

    def __init__(self, ours: Any, meta_batches: int, epoch_batches: int) -> None:
        import learn2learn as l2l

        super().__init__(ours, meta_batches, epoch_batches)
        self.model = copy.deepcopy(ours.backbone)
        self.scale = nn.Parameter(ours.scale.detach().clone(), requires_grad=ours.scale.requires_grad)
        self.svm = l2l.nn.SVClassifier(C_reg=ours.C, max_iters=ours.solver_iters, normalize=False)
        self.iters, self.iters_eval = ours.solver_iters, ours.solver_iters_eval
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[ours.solver_dtype]
        if ours.label_smoothing or ours.head != "svm":
            raise ValueError("the SVClassifier reference needs head='svm' and label_smoothing=0")
        self.outer([*self.model.parameters(), self.scale], ours)

    def batch_logits(self, batch: EpisodeBatch, training: bool) -> Tensor:
        iters = self.iters if training else self.iters_eval
        x = torch.cat([batch.support_x, batch.query_x], dim=1)
        z = self.model(x.flatten(0, 1)).view(*x.shape[:2], -1).to(self.dtype)
        shots_total = batch.support_x.shape[1]
        out = []
        default = torch.get_default_dtype()
        # SVClassifier builds its identity matrices and one-hot labels in the default dtype: make it the solver's.
        torch.set_default_dtype(self.dtype)
        try:
            for t in range(batch.num_tasks):
                ways = int(batch.support_y[t].max()) + 1
                self.svm.fit_(z[t, :shots_total], batch.support_y[t], ways=ways, max_iters=iters)
                out.append(self.scale.to(self.dtype) * self.svm(z[t, shots_total:]))
        finally:
            torch.set_default_dtype(default)
        return torch.stack(out).float()

    def batch_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())


class L2LReptile(Reference):
    """learn2learn's Reptile recipe: a deep copy per task, torch Adam (beta1 0) whose state carries over from task
    to task, random inner mini-batches with replacement, the mean of ``theta - phi`` as gradient of outer SGD,
    its meta learning rate annealed linearly (to 0, as our ``outer_lr_anneal``)."""

    def __init__(self, ours: Any, meta_batches: int, epoch_batches: int) -> None:
        super().__init__(ours, meta_batches, epoch_batches)
        self.model = l2l_network(ours.network)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=ours.outer_lr)
        self.scheduler = None
        self.outer_lr, self.anneal = ours.outer_lr, ours.hparams.get("outer_lr_anneal", True)
        self.inner_lr, self.steps, self.steps_eval = ours.inner_lr, ours.inner_steps, ours.inner_steps_eval
        self.batch_size, self.batch_size_eval = ours.inner_batch_size, ours.inner_batch_size_eval
        if not ours.transductive or type(ours.inner_optimizer).__name__ != "Adam":
            raise ValueError("the Reptile recipe reference needs transductive=True and the Adam inner optimiser")
        self.adapt_state: dict[str, Any] | None = None
        self.generator = torch.Generator().manual_seed(0)

    def fine_tune(self, support_x: Tensor, support_y: Tensor, steps: int, size: int) -> tuple[nn.Module, Any]:
        learner = copy.deepcopy(self.model)
        # betas=(0.0, ...): the recipe's (0, 0.999) mixes an int and a float, which torch 2.14's Adam refuses.
        adapt_opt = torch.optim.Adam(learner.parameters(), lr=self.inner_lr, betas=(0.0, 0.999))
        if self.adapt_state is not None:
            adapt_opt.load_state_dict(self.adapt_state)
        for _ in range(steps):
            idx = torch.randint(len(support_y), size=(size,), generator=self.generator)
            adapt_opt.zero_grad()
            F.cross_entropy(learner(support_x[idx]), support_y[idx]).backward()
            adapt_opt.step()
        return learner, adapt_opt.state_dict()

    def train_step(self, batch: EpisodeBatch, i: int) -> float:
        lr = self.outer_lr * (1 - i / self.meta_batches) if self.anneal else self.outer_lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        total = 0.0
        for t in range(batch.num_tasks):
            learner, self.adapt_state = self.fine_tune(batch.support_x[t], batch.support_y[t], self.steps,
                                                       self.batch_size)  # fmt: skip
            with torch.no_grad():
                total += F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t]).item()
                for p, q in zip(self.model.parameters(), learner.parameters(), strict=True):
                    p.grad.add_(q, alpha=-1.0)
        with torch.no_grad():
            for p in self.model.parameters():
                p.grad.mul_(1.0 / batch.num_tasks).add_(p)
        self.optimizer.step()
        return total / batch.num_tasks

    def end_of_batch(self, i: int) -> None:
        pass

    def predict(self, batch: EpisodeBatch) -> Tensor:
        out = []
        for t in range(batch.num_tasks):
            learner, _ = self.fine_tune(batch.support_x[t], batch.support_y[t], self.steps_eval, self.batch_size_eval)
            with torch.no_grad():
                out.append(learner(batch.query_x[t]))
        return torch.stack(out)


class EasyFSLMatchingNet(MetricReference):
    """easyfsl's ``MatchingNetworks`` with its full context embeddings switched off (the shipped configs have
    ``fce: false``; easyfsl always uses its own FCE): cosine attention on normalised support features,
    log-probabilities, NLL loss, support and query embedded in separate passes as easyfsl does."""

    def __init__(self, ours: Any, meta_batches: int, epoch_batches: int) -> None:
        from easyfsl.methods import MatchingNetworks

        super().__init__(ours, meta_batches, epoch_batches)
        if ours.fce or ours.normalize_queries:
            raise ValueError("the easyfsl reference is wired for fce=False, normalize_queries=False")

        class WithoutFCE(MatchingNetworks):
            def encode_support_features(self, support_features: Tensor) -> Tensor:
                return support_features

            def encode_query_features(self, query_features: Tensor) -> Tensor:
                return query_features

        dim = ours.backbone.embedding_dim
        self.model = WithoutFCE(copy.deepcopy(ours.backbone), feature_dimension=dim)
        self.outer(list(self.model.backbone.parameters()), ours)

    @staticmethod
    def loss(logits: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(logits, target)  # easyfsl's MatchingNetworks returns log-probabilities

    def logits(self, batch: EpisodeBatch, t: int) -> Tensor:
        self.model.process_support_set(batch.support_x[t], batch.support_y[t])
        return self.model(batch.query_x[t])


class EasyFSLFinetune(Reference):
    """easyfsl's ``Finetune`` on our pre-trained Baseline++ backbone: the test-time part only.

    easyfsl has no pre-training loop (its notebooks train a classifier by hand), so theirs reuses the
    backbone ours pre-trained, and the row compares the episode heads: easyfsl's prototypes
    fine-tuned with Adam on ``temperature * cosine`` logits against ours (``head_steps``, ``head_lr``
    and the cosine scale of Baseline++ as easyfsl's steps, learning rate and temperature).
    """

    shares_training = True

    def __init__(self, ours: Any, meta_batches: int, epoch_batches: int) -> None:
        super().__init__(ours, meta_batches, epoch_batches)
        self.ours: Any = ours
        self.models: dict[int, nn.Module] = {}

    def predict(self, batch: EpisodeBatch) -> Tensor:
        from easyfsl.methods import Finetune

        ways = int(batch.support_y.max()) + 1
        if ways not in self.models:  # built at the first test batch: from the backbone ours has trained
            backbone = copy.deepcopy(self.ours.backbone).eval()
            self.models[ways] = Finetune(backbone, fine_tuning_steps=self.ours.head_steps,
                                         fine_tuning_lr=self.ours.head_lr,
                                         temperature=self.ours.scale_for(ways)).eval()  # fmt: skip
        model = self.models[ways]
        out = []
        for t in range(batch.num_tasks):
            with torch.no_grad():
                model.process_support_set(batch.support_x[t], batch.support_y[t])
            out.append(model(batch.query_x[t]))
        return torch.stack(out)


REFERENCES: dict[str, type[Reference]] = {
    "maml": L2LMAML,
    "fomaml": L2LMAML,
    "metasgd": L2LMAML,
    "anil": L2LANIL,
    "protonet": L2LProtoNet,
    "metaoptnet": L2LMetaOptNet,
    "reptile": L2LReptile,
    "matchingnet": EasyFSLMatchingNet,
    "finetune": EasyFSLFinetune,
}


# ----------------------------------------------------------------------------- statistics and the ledger
def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its normal 95% CI (``1.96 * sample std / sqrt(n)``, as ConfidenceInterval95)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return mean, 1.96 * math.sqrt(var / n)


def commit() -> str:
    """The commit of the code that runs (``-dirty`` with uncommitted changes to tracked files)."""
    # A snapshot of the tree (git archive) that runs in the background has no .git: it carries a COMMIT file.
    if (REPO / "COMMIT").exists():
        return (REPO / "COMMIT").read_text().strip()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)  # fmt: skip
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    """The CPU (and its bf16 features), threads, torch and commit of a run."""
    info = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", info)
    return {
        "cpu": model.group(1) if model else platform.processor(),
        "bf16_flags": sorted(set(re.findall(r"\b(amx_bf16|avx512_bf16)\b", info))),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": commit(),
        # A shared machine's wall times mean little without it: 1, 5 and 15 min load averages at the row's end.
        "loadavg": [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Atomically: a temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def windows(losses: list[float]) -> dict[str, float]:
    """Mean training loss over the first and last tenth of the run (is it still falling?)."""
    k = max(1, len(losses) // 10)
    return {"first_tenth": sum(losses[:k]) / k, "last_tenth": sum(losses[-k:]) / k}


# ----------------------------------------------------------------------------- the two modes
def train_ours(model: Any, dm: Any, steps: int, precision: str = "32-true") -> tuple[pl.Trainer, Recorder, float]:
    recorder = Recorder()
    trainer = trainer_for(steps, recorder, precision)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return trainer, recorder, time.perf_counter() - start


def train_theirs(
    ref: Reference, dm: Any, steps: int, prints: list[list[float]]
) -> tuple[list[float], float, list[float]]:
    """Train the reference on the batches ours trained on (checked by fingerprint); losses, wall time, step times."""
    losses: list[float] = []
    step_s: list[float] = []
    start = time.perf_counter()
    for i, batch in enumerate(train_stream(dm, steps)):
        if prints and fingerprint(batch) != prints[i]:
            raise RuntimeError(f"training batch {i} differs from the one our Trainer drew; the streams are out of step")
        begin = time.perf_counter()
        losses.append(ref.train_step(batch, i))
        ref.end_of_batch(i)
        step_s.append(time.perf_counter() - begin)
    return losses, time.perf_counter() - start, step_s


def median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def reference_for(method: str, model: Any, steps: int, dm: Any) -> Reference:
    from lightning_meta import ChannelsLast

    # The module asks the Trainer for channels-last weights (its configure_callbacks); the reference copies
    # the weights now, before the Trainer's setup, so give it the same memory format (same rounding).
    if any(isinstance(c, ChannelsLast) for c in model.configure_callbacks() or []):
        ChannelsLast.convert(model)
    dm.setup("fit")
    epoch_batches = len(dm.streams["train"]) if "train" in dm.streams else 1
    return REFERENCES[method](model, steps, epoch_batches)


def test_both(trainer: pl.Trainer, model: Any, dm: Any, ref: Reference, recorder: Recorder) -> dict[str, Any]:
    """Test ours (the Trainer) and theirs on the same fixed test episodes: per-episode accuracies and wall times."""
    recorder.test_acc, recorder.test_prints = [], []
    start = time.perf_counter()
    trainer.test(model, datamodule=dm, verbose=False)
    ours_s = time.perf_counter() - start
    theirs, theirs_s = test_theirs(ref, dm, recorder.test_prints)
    return paired(list(recorder.test_acc), ours_s, theirs, theirs_s)


def test_theirs(ref: Reference, dm: Any, prints: list[list[float]]) -> tuple[list[float], float]:
    """The reference's per-episode test accuracies (on the batches ours was tested on) and its wall time."""
    theirs: list[float] = []
    start = time.perf_counter()
    for j, batch in enumerate(test_batches(dm)):
        if fingerprint(batch) != prints[j]:
            raise RuntimeError(f"test batch {j} differs from the one our Trainer tested on")
        theirs += episode_accuracy(ref.predict(batch), batch.query_y).tolist()
    return theirs, time.perf_counter() - start


def paired(ours: list[float], ours_s: float, theirs: list[float], theirs_s: float) -> dict[str, Any]:
    """Both accuracies with their 95% CIs and the paired difference (same episodes) with its 95% CI."""
    ours_mean, ours_ci = mean_ci(ours)
    theirs_mean, theirs_ci = mean_ci(theirs)
    diff_mean, diff_ci = mean_ci([a - b for a, b in zip(ours, theirs, strict=True)])
    return {
        "ours": {"acc": ours_mean, "ci95": ours_ci, "test_s": ours_s, "episode_acc": ours},
        "theirs": {"acc": theirs_mean, "ci95": theirs_ci, "test_s": theirs_s, "episode_acc": theirs},
        "difference": {"mean": diff_mean, "ci95": diff_ci, "agree": abs(diff_mean) <= diff_ci},
    }


def run_row(method: str, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train and test ours and theirs for one row; the ledger record."""
    model, dm, command = build(method, setting, args.root, args.extra)
    ref = reference_for(method, model, args.meta_batches, dm)
    trainer, recorder, ours_train_s = train_ours(model, dm, args.meta_batches)
    if ref.shares_training:
        their_losses, theirs_train_s, their_step_s = [], 0.0, []
    else:
        their_losses, theirs_train_s, their_step_s = train_theirs(ref, dm, args.meta_batches, recorder.train_prints)
    tested = test_both(trainer, model, dm, ref, recorder)
    record: dict[str, Any] = {
        "mode": "accuracy",
        "method": method,
        "setting": setting,
        "reference": METHODS[method][2],
        "config": command,
        "meta_batches": args.meta_batches,
        "test_episodes": len(tested["theirs"]["episode_acc"]),
        "chance": 1 / int(setting.split("w")[0]),
        "ours": {
            **tested["ours"],
            "train_s": ours_train_s,
            "loss": windows(recorder.losses),
            "step_s": median(recorder.step_s),
        },  # fmt: skip
        "theirs": {
            **tested["theirs"],
            "train_s": theirs_train_s,
            "trained": not ref.shares_training,
            "loss": windows(their_losses) if their_losses else None,
            "step_s": median(their_step_s),
        },  # fmt: skip
        "difference": tested["difference"],
    }
    if args.cross and not ref.shares_training:
        # The reference's test-time algorithm on the weights ours trained: tells a test-time difference from
        # a training one (fp32 rounding makes two equivalent trainings drift apart over the steps).
        cross = reference_for(method, model, args.meta_batches, dm)
        theirs, theirs_s = test_theirs(cross, dm, recorder.test_prints)
        record["theirs_on_our_weights"] = paired(tested["ours"]["episode_acc"], 0.0, theirs, theirs_s)
    if method == "metaoptnet":
        # The test-time solve stops after solver_iters_eval (3) iterations: are both near the SVM's optimum there?
        model.solver_iters_eval = ref.iters_eval = 15  # type: ignore[attr-defined]
        record["solver_iters_eval_15"] = test_both(trainer, model, dm, ref, recorder)
    record["tag"], record["extra"] = args.tag, args.extra
    record["machine"] = machine()
    return record


def cross_only(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Add ``--cross`` to a row already in the ledger without testing ours again (Reptile's test takes ~25 min).

    Ours is trained again from the same config and batches; its training losses must equal the
    ledger's (the same weights, so the ledger's per-episode accuracies of ours are this model's),
    then theirs is tested on those weights and paired with them.
    """
    record = json.loads(path.read_text())
    model, dm, _ = build(record["method"], record["setting"], args.root, record.get("extra") or [])
    _, recorder, _ = train_ours(model, dm, record["meta_batches"])
    if windows(recorder.losses) != record["ours"]["loss"]:
        raise RuntimeError(
            f"ours trained to other losses than {path} records ({windows(recorder.losses)} vs "
            f"{record['ours']['loss']}): the code changed since; run the row again with --force"
        )
    cross = reference_for(record["method"], model, record["meta_batches"], dm)
    prints = [fingerprint(batch) for batch in test_batches(dm)]
    theirs, theirs_s = test_theirs(cross, dm, prints)
    record["theirs_on_our_weights"] = paired(record["ours"]["episode_acc"], 0.0, theirs, theirs_s)
    record["cross_machine"] = machine()
    return record


def step_losses(
    method: str,
    setting: str,
    steps: int,
    root: str,
    extra: list[str] | tuple[str, ...] = (),
    precision: str = "32-true",
) -> dict:
    """The first ``steps`` training losses of ours (in ``precision``) and theirs from the same weights and batches."""
    model, dm, command = build(method, setting, root, extra)
    ref = reference_for(method, model, steps, dm)
    _, recorder, _ = train_ours(model, dm, steps, precision)
    theirs, _, _ = train_theirs(ref, dm, steps, recorder.train_prints)
    ours = recorder.losses
    relative = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, theirs, strict=True)]
    return {"mode": "steps", "method": method, "setting": setting, "reference": METHODS[method][2],
            "config": command, "steps": steps, "ours": ours, "theirs": theirs, "relative": relative,
            "max_relative": max(relative), "first_relative": relative[0]}  # fmt: skip


# ----------------------------------------------------------------------------- the table
def _cells(result: dict[str, Any]) -> str:
    o, t, d = result["ours"], result["theirs"], result["difference"]
    return (
        f"| {100 * o['acc']:.2f} ± {100 * o['ci95']:.2f} | {100 * t['acc']:.2f} ± {100 * t['ci95']:.2f} "
        f"| {100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f} | {'yes' if d['agree'] else '**no**'} "
    )


def table(out: Path) -> str:
    """The markdown table of every accuracy record in ``out`` (and the step comparisons), from the JSON files.

    Beside each row's budget, the whole schedule of its config in meta-batches (``?`` where it is not in
    episodes), whose header says how it follows the paper's.

    Below a row: the reference tested on the weights ours trained (``--cross``), MetaOptNet at 15 solver
    iterations, and for a variant (``--tag``) the paired difference of its ours from the untagged row's ours.
    """
    from reproduce import config_schedule  # the sibling benchmark's reading of a config's schedule

    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    order = {m: i for i, m in enumerate(METHODS)}
    acc = sorted(
        (r for r in records if r["mode"] == "accuracy"),
        key=lambda r: (r["setting"], order.get(r["method"], 99), r["meta_batches"], r.get("tag", "")),
    )
    plain = {(r["method"], r["setting"], r["meta_batches"]): r for r in acc if not r.get("tag")}
    lines = [
        "| method | setting | reference | meta-batches (config's schedule) | ours acc % | theirs acc % "
        "| ours - theirs (paired) | within CI | ours train / test | theirs train / test |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in acc:
        o, t = r["ours"], r["theirs"]
        name = r["method"] + (f" [{' '.join(r['extra'])}]" if r.get("tag") else "")
        schedule = config_schedule(REPO / r["config"].split()[0])
        head = f"| {name} | {r['setting']} | {r['reference']} | {r['meta_batches']} ({schedule}) "
        theirs_train = f"{t['train_s'] / 60:.1f} min" if t.get("trained", True) else "(ours)"
        lines.append(head + _cells(r) + f"| {o['train_s'] / 60:.1f} min / {o['test_s']:.0f} s "
                     f"| {theirs_train} / {t['test_s']:.0f} s |")  # fmt: skip
        notes = [("theirs_on_our_weights", "theirs tested on the weights ours trained"),
                 ("solver_iters_eval_15", "same models, 15 solver iterations at test")]  # fmt: skip
        for key, what in notes:
            if key in r:
                lines.append(f"| {name}: {what} | {r['setting']} | | " + _cells(r[key]) + "| | |")
        base = plain.get((r["method"], r["setting"], r["meta_batches"]))
        if r.get("tag") and base is not None:
            diff = paired(o["episode_acc"], 0.0, base["ours"]["episode_acc"], 0.0)
            lines.append(f"| {name}: ours of this variant (left) against ours as shipped (right) | {r['setting']} | | "
                         + _cells(diff) + "| | |")  # fmt: skip
    steps = [r for r in records if r["mode"] == "steps"]
    if steps:
        lines += ["", "| method | setting | steps | step-1 loss ours / theirs | first steps within 1e-6 (fp32 noise) "
                  "| max relative difference |", "|---|---|---|---|---|---|"]  # fmt: skip
        for r in sorted(steps, key=lambda r: (r["setting"], order.get(r["method"], 99))):
            same = next((i for i, x in enumerate(r["relative"]) if x > 1e-6), len(r["relative"]))
            lines.append(f"| {r['method']} | {r['setting']} | {r['steps']} | {r['ours'][0]:.5f} / "
                         f"{r['theirs'][0]:.5f} | {same} | {r['max_relative']:.1e} |")  # fmt: skip
    if records:
        m = records[-1]["machine"]
        commits = sorted({r["machine"]["commit"] for r in records})
        loads = sorted(r["machine"]["loadavg"][1] for r in records if "loadavg" in r["machine"])
        load = f", 5-min load average at the end of a row {loads[0]:.1f} to {loads[-1]:.1f}" if loads else ""
        amx = "" if "amx_bf16" in m["bf16_flags"] else ", no AMX"
        lines += ["", f"Machine: {m['cpu']} ({m['cores']} cores, bf16 flags {m['bf16_flags'] or 'none'}{amx}), "
                  f"{m['threads']} thread per run{load}, torch {m['torch']}, commit {', '.join(commits)}."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(REFERENCES), choices=list(METHODS))
    parser.add_argument("--settings", nargs="+", default=["5w1s"], choices=["5w1s", "20w1s"])
    parser.add_argument("--meta_batches", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=0, help="compare the first STEPS training losses instead")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--root", default=str(Path(os.environ.get("LIGHTNING_META_DATA", REPO.parent / "shared" / "data")) / "omniglot")
    )
    parser.add_argument("--out", type=Path, default=Path("/work/runs/parity"))
    parser.add_argument("--extra", default="", help='more CLI overrides of the config, one string: --extra="--a.b 1"')
    parser.add_argument("--force", action="store_true", help="run rows already in --out again")
    parser.add_argument("--cross", action="store_true", help="also test theirs on the weights ours trained")
    parser.add_argument(
        "--cross_only", action="store_true", help="add --cross to rows in --out: retrain ours (checked), test theirs"
    )
    parser.add_argument("--tag", default="", help="a variant's name (with --extra): its own ledger file and row")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the records in --out")
    args = parser.parse_args(argv)
    args.extra = shlex.split(args.extra)
    if args.table:
        print(table(args.out))
        return
    torch.set_num_threads(args.threads)
    for setting in args.settings:
        for method in args.methods:
            if method not in REFERENCES:
                print(f"{method}: no reference wired up yet; skipped", file=sys.stderr)
                continue
            mode = f"steps{args.steps}" if args.steps else f"mb{args.meta_batches}"
            path = args.out / f"{method}_{setting}_{mode}{'_' + args.tag if args.tag else ''}.json"
            if args.cross_only:
                write_json(path, cross_only(path, args))
                print(f"{path}: {json.dumps(json.loads(path.read_text())['theirs_on_our_weights']['difference'])}")
                continue
            if path.exists() and not args.force:
                print(f"{path} exists; skipped (--force to run again)")
                continue
            if args.steps:
                record = step_losses(method, setting, args.steps, args.root, args.extra)
                record["machine"] = machine()
            else:
                record = run_row(method, setting, args)
            write_json(path, record)
            print(json.dumps({k: v for k, v in record.items() if k in ("method", "setting", "max_relative")}
                             | {k: {kk: vv for kk, vv in record[k].items() if kk != "episode_acc"}
                                for k in ("ours", "theirs", "difference") if isinstance(record.get(k), dict)}),
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
