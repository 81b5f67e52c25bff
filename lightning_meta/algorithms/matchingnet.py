"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from datamodules.episodes import EpisodeBatch

from ..backbones import Conv4
from ..bases.episodic import EpisodicModule, embed_episode, support_onehot
from ..memory_format import channels_last_argument


class MatchingNet(EpisodicModule):
    """Matching Networks: predict a query's label as the attention-weighted mix of the support labels.

    The attention is a softmax over the cosine similarities between the query embedding and each
    support embedding (Vinyals et al. 2016, eq. 1-2); the loss is the negative log-likelihood of the
    mixed label distribution. As in the authors' follow-up implementations (and easyfsl), only the
    support embeddings are normalised by default: the query's norm then acts as a learned inverse
    temperature. With ``normalize_queries=True`` the similarities are plain cosines in [-1, 1],
    whose softmax can favour one support item over another by at most e^2, which caps the
    attainable likelihood (about 0.65 for the right class in 5-way 1-shot) and slows learning.

    With ``fce`` the embeddings are full context embeddings (appendix A):
    a bidirectional LSTM over the support set, ``g(x_i) = h_fwd_i + h_bwd_i + g'(x_i)``, and an
    attention LSTM that reads the support set ``fce_steps`` times for each query.

    Args:
        backbone: embedding network; default ``Conv4(in_channels=1)`` (Omniglot).
        fce: use full context embeddings.
        fce_steps: read steps of the attention LSTM (K in the paper's appendix).
        normalize_queries: also normalise the query embeddings (textbook cosine similarity).
        embedding_dim: size of the backbone's output, needed by the LSTMs; default
            ``backbone.embedding_dim``.
        channels_last: deprecated; this module asks the Trainer for the
            :class:`~lightning_meta.memory_format.ChannelsLast` callback (False here turns that off).
        optimizer: outer optimizer factory (Adam, lr 1e-3).
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        fce: bool = False,
        fce_steps: int = 5,
        normalize_queries: bool = False,
        embedding_dim: int | None = None,
        channels_last: bool | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        backbone = backbone if backbone is not None else Conv4()
        super().__init__(backbone, optimizer, lr_scheduler)
        self.fce, self.fce_steps = fce, fce_steps
        self.wants_channels_last = channels_last_argument("MatchingNet", channels_last, True)
        self.normalize_queries = normalize_queries
        if fce:
            dim = embedding_dim or getattr(backbone, "embedding_dim", None)
            if not dim:
                raise ValueError("fce=True needs embedding_dim= (the backbone's output size)")
            self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
            self.query_lstm = nn.LSTMCell(dim, dim)

    def full_context(self, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """The paper's full context embeddings ``g`` of the support set and ``f`` of the queries."""
        dim = support.shape[-1]
        out, _ = self.support_lstm(support)
        support = support + out[..., :dim] + out[..., dim:]
        tasks, queries = query.shape[:2]
        flat = query.reshape(tasks * queries, dim)
        h, c = torch.zeros_like(flat), torch.zeros_like(flat)
        keys = support.repeat_interleave(queries, dim=0)  # [B*Q, S, D]
        for _ in range(self.fce_steps):
            attention = torch.softmax(torch.einsum("qd,qsd->qs", h, keys), dim=-1)
            readout = torch.einsum("qs,qsd->qd", attention, keys)
            h, c = self.query_lstm(flat, (h + readout, c))
            h = h + flat
        return support, h.view(tasks, queries, dim)

    def attention(self, batch: EpisodeBatch) -> Tensor:
        """Softmax over the similarities of each query to each support item: ``[B, N*Q, N*K]``."""
        support, query = embed_episode(self.backbone, batch)
        if self.fce:
            support, query = self.full_context(support, query)
        if self.normalize_queries:
            query = F.normalize(query, dim=-1)
        similarity = query @ F.normalize(support, dim=-1).transpose(1, 2)
        return torch.softmax(similarity, dim=-1)

    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        attention = self.attention(batch)
        probabilities = attention @ support_onehot(batch, attention.dtype)  # [B, N*Q, N]
        # Log-probabilities as logits: cross-entropy on them is the paper's negative log-likelihood.
        return probabilities.clamp_min(1e-12).log()
