"""CheXficient's online prototype curator.

Faithful to the method (reference/seeds.md, CheXficient):

* **Warm-up.** The first ``warmup_batches`` gathered batches train on every sample; their
  concatenated, L2-normalised image+text embeddings are buffered. Then k-means (K =
  ``num_prototypes``) on the buffer gives the prototypes, and the buffered batches are curated
  retroactively so that every sample of the curation epoch gets a decision.
* **Per step.** Every sample of the gathered batch is assigned to its nearest prototype. Within
  each cluster, with q_s / q_o the ``support_quantile`` / ``outlier_quantile`` of the cluster's
  distances in this batch: d > q_o -> *outlier* (dropped); q_s < d <= q_o -> *support* (kept);
  d <= q_s -> *central*, of which at most ``central_cap`` per cluster are kept, chosen by
  farthest-point sampling (so the kept central samples cover the cluster, not its densest spot).
* **Loss** on kept samples only (the trainer drops the others from the contrastive batch).
* **Prototype update.** The kept features are assigned to prototypes by Sinkhorn-Knopp balancing
  (so no prototype collapses), then hard argmax; each prototype moves by EMA (``ema`` = 0.9)
  towards the mean of its assigned features and is re-normalised.
* **Soft variant** (``mode: soft``): outliers are still dropped, but instead of the hard
  central cap every remaining sample gets a weight that grows with its distance from its
  prototype, relative to the cluster mean (``(d / mean_d) ** soft_power``, clipped to
  ``[soft_min_weight, soft_max_weight]``): "emphasise far, down-weight near". The weights
  scale the loss during curation and become sampling weights for the epochs after it.

Decisions are recorded per dataset index (last decision wins), which is how the trainer
builds the kept subset after the curation epochs. Everything is deterministic given the seed
and the batch order; the curator's state round-trips through :meth:`state_dict`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: Sample categories recorded per dataset index.
UNSEEN, WARMUP, OUTLIER, SUPPORT, CENTRAL_KEPT, CENTRAL_DROPPED = 0, 1, 2, 3, 4, 5
CATEGORY_NAMES = {
    UNSEEN: "unseen",
    WARMUP: "warmup",
    OUTLIER: "outlier",
    SUPPORT: "support",
    CENTRAL_KEPT: "central_kept",
    CENTRAL_DROPPED: "central_dropped",
}
KEPT_CATEGORIES = (SUPPORT, CENTRAL_KEPT)


@dataclass(frozen=True)
class CuratorConfig:
    """The ``clip.curator`` config block (defaults = the released CheXficient config)."""

    enabled: bool = True
    mode: str = "hard"  # hard | soft
    num_prototypes: int = 6
    warmup_batches: int = 10
    outlier_quantile: float = 0.95
    support_quantile: float = 0.85
    central_cap: int = 10
    ema: float = 0.9
    sinkhorn_iters: int = 3
    sinkhorn_epsilon: float = 0.05
    curation_epochs: int = 1
    kmeans_n_init: int = 4
    soft_power: float = 1.0
    soft_min_weight: float = 0.1
    soft_max_weight: float = 10.0
    #: soft mode, after curation: samples drawn per epoch (with replacement, by weight) as a
    #: fraction of the number of non-outlier samples.
    soft_sample_fraction: float = 0.5

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> CuratorConfig:
        """Build from a config mapping, rejecting unknown keys and invalid values."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"clip.curator: unknown keys {unknown}")
        out = cls(**cfg)
        if out.mode not in ("hard", "soft"):
            raise ValueError(f"clip.curator.mode must be 'hard' or 'soft', got {out.mode!r}")
        if not 0.0 < out.support_quantile < out.outlier_quantile <= 1.0:
            raise ValueError("clip.curator: need 0 < support_quantile < outlier_quantile <= 1")
        if out.num_prototypes < 1 or out.warmup_batches < 1 or out.central_cap < 1:
            raise ValueError("clip.curator: num_prototypes, warmup_batches, central_cap >= 1")
        if not 0.0 <= out.ema < 1.0:
            raise ValueError("clip.curator.ema must be in [0, 1)")
        return out


@dataclass
class Curation:
    """The curator's decision on one gathered batch (tensors of length N)."""

    keep: torch.Tensor  # bool
    weights: torch.Tensor  # float, loss weights (1 for hard mode / warm-up)
    category: torch.Tensor  # int8, see the category constants
    cluster: torch.Tensor  # int64, -1 during warm-up
    distance: torch.Tensor  # float, nan during warm-up


def joint_embedding(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Concatenate L2-normalised image and text embeddings and re-normalise to unit length."""
    z = torch.cat([F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)], dim=-1)
    return F.normalize(z, dim=-1)


def farthest_point_sampling(x: torch.Tensor, k: int, start: int = 0) -> torch.Tensor:
    """Indices of ``k`` rows of ``x`` chosen greedily to maximise the minimum pairwise distance.

    Starts from row ``start``; ties break to the lowest index (deterministic).
    """
    n = x.shape[0]
    if k >= n:
        return torch.arange(n)
    chosen = [start]
    min_d = torch.cdist(x, x[start : start + 1]).squeeze(1)
    for _ in range(k - 1):
        nxt = int(torch.argmax(min_d))
        chosen.append(nxt)
        min_d = torch.minimum(min_d, torch.cdist(x, x[nxt : nxt + 1]).squeeze(1))
    return torch.tensor(chosen, dtype=torch.long)


def sinkhorn(scores: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp: a soft assignment (N, K) with equal prototype marginals (SwAV-style)."""
    q = torch.exp((scores - scores.max()) / epsilon).t()  # (K, N)
    q = q / q.sum()
    k, n = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


def split_cluster(
    distance: torch.Tensor, support_q: float, outlier_q: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(outlier, support, central) boolean masks of one cluster from its members' distances."""
    hi = torch.quantile(distance, outlier_q)
    lo = torch.quantile(distance, support_q)
    outlier = distance > hi
    support = (distance > lo) & ~outlier
    central = distance <= lo
    return outlier, support, central


class PrototypeCurator:
    """Online curator; see the module docstring. ``num_samples`` sizes the per-index record."""

    def __init__(self, cfg: CuratorConfig, num_samples: int, seed: int) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.prototypes: torch.Tensor | None = None
        self._buffer: list[tuple[torch.Tensor, torch.Tensor]] = []  # (joint z, dataset ids)
        self.steps = 0
        self.category = np.zeros(num_samples, dtype=np.int8)
        self.weight = np.ones(num_samples, dtype=np.float32)
        self.cluster = np.full(num_samples, -1, dtype=np.int16)
        self.distance = np.full(num_samples, np.nan, dtype=np.float32)

    @property
    def ready(self) -> bool:
        """True once the prototypes exist (warm-up is over)."""
        return self.prototypes is not None

    # -- public API ------------------------------------------------------------------------
    def step(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> Curation:
        """Curate one gathered batch of (detached) embeddings with dataset indices ``ids``."""
        self.steps += 1
        z = joint_embedding(image.detach().cpu(), text.detach().cpu())
        ids = ids.detach().cpu().long()
        if not self.ready:
            self._buffer.append((z, ids))
            self._record(ids, Curation(*self._warmup_decision(len(ids))))
            if len(self._buffer) >= self.cfg.warmup_batches:
                self._init_prototypes()
            return Curation(*self._warmup_decision(len(ids)))
        return self._curate(z, ids)

    def reset_epoch(self) -> None:
        """Nothing per-epoch to reset (decisions are last-wins); kept for a symmetric API."""

    def summary(self) -> dict[str, Any]:
        """Counts per category over the recorded decisions."""
        counts = np.bincount(self.category, minlength=len(CATEGORY_NAMES))
        out = {f"n_{CATEGORY_NAMES[c]}": int(counts[c]) for c in CATEGORY_NAMES}
        out["n_kept"] = int(sum(counts[c] for c in KEPT_CATEGORIES))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically after a resume."""
        return {
            "cfg": asdict(self.cfg),
            "seed": self.seed,
            "steps": self.steps,
            "prototypes": self.prototypes,
            "buffer": self._buffer,
            "category": torch.from_numpy(self.category.copy()),
            "weight": torch.from_numpy(self.weight.copy()),
            "cluster": torch.from_numpy(self.cluster.copy()),
            "distance": torch.from_numpy(self.distance.copy()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.steps = int(state["steps"])
        self.prototypes = state["prototypes"]
        self._buffer = list(state["buffer"])
        self.category = state["category"].numpy().copy()
        self.weight = state["weight"].numpy().copy()
        self.cluster = state["cluster"].numpy().copy()
        self.distance = state["distance"].numpy().copy()

    # -- internals -------------------------------------------------------------------------
    @staticmethod
    def _warmup_decision(n: int) -> tuple[torch.Tensor, ...]:
        return (
            torch.ones(n, dtype=torch.bool),
            torch.ones(n),
            torch.full((n,), WARMUP, dtype=torch.int8),
            torch.full((n,), -1, dtype=torch.long),
            torch.full((n,), float("nan")),
        )

    def _init_prototypes(self) -> None:
        from sklearn.cluster import KMeans

        z = torch.cat([b[0] for b in self._buffer]).double().numpy()
        k = self.cfg.num_prototypes
        if len(z) < k:
            raise ValueError(f"curator warm-up gave {len(z)} samples, fewer than K={k} prototypes")
        km = KMeans(n_clusters=k, n_init=self.cfg.kmeans_n_init, random_state=self.seed).fit(z)
        self.prototypes = F.normalize(torch.from_numpy(km.cluster_centers_).float(), dim=-1)
        log.info("curator: %d prototypes from %d warm-up samples", k, len(z))
        buffer, self._buffer = self._buffer, []
        # Retroactive decisions for the warm-up batches, in order (with EMA updates).
        for zb, ids in buffer:
            self._curate(zb, ids)

    def _curate(self, z: torch.Tensor, ids: torch.Tensor) -> Curation:
        cfg = self.cfg
        assert self.prototypes is not None
        dist = torch.cdist(z, self.prototypes)  # (N, K); unit vectors: monotone in cosine
        distance, cluster = dist.min(dim=1)
        n = z.shape[0]
        category = torch.full((n,), CENTRAL_DROPPED, dtype=torch.int8)
        weights = torch.ones(n)
        for c in torch.unique(cluster).tolist():
            members = (cluster == c).nonzero().squeeze(1)
            d = distance[members]
            outlier, support, central = split_cluster(d, cfg.support_quantile, cfg.outlier_quantile)
            category[members[outlier]] = OUTLIER
            category[members[support]] = SUPPORT
            central_idx = members[central]
            if cfg.mode == "hard":
                # FPS starts from the most prototypical central sample.
                start = int(torch.argmin(distance[central_idx]))
                pick = farthest_point_sampling(z[central_idx], cfg.central_cap, start=start)
                category[central_idx[pick]] = CENTRAL_KEPT
            else:
                category[central_idx] = CENTRAL_KEPT
                rel = d / d.mean().clamp_min(1e-8)
                w = rel.pow(cfg.soft_power).clamp(cfg.soft_min_weight, cfg.soft_max_weight)
                weights[members] = w
        keep = (category == SUPPORT) | (category == CENTRAL_KEPT)
        weights = torch.where(keep, weights, torch.zeros_like(weights))
        if cfg.mode == "soft" and keep.any():
            weights = weights / weights[keep].mean()  # mean 1 over kept: loss scale unchanged
        result = Curation(keep, weights, category, cluster, distance)
        self._record(ids, result)
        self._update_prototypes(z[keep])
        return result

    def _update_prototypes(self, z: torch.Tensor) -> None:
        if z.shape[0] == 0:
            return
        assert self.prototypes is not None
        q = sinkhorn(z @ self.prototypes.t(), self.cfg.sinkhorn_epsilon, self.cfg.sinkhorn_iters)
        hard = q.argmax(dim=1)
        new = self.prototypes.clone()
        for k in torch.unique(hard).tolist():
            mean = z[hard == k].mean(dim=0)
            new[k] = self.cfg.ema * self.prototypes[k] + (1.0 - self.cfg.ema) * mean
        self.prototypes = F.normalize(new, dim=-1)

    def _record(self, ids: torch.Tensor, cur: Curation) -> None:
        idx = ids.numpy()
        self.category[idx] = cur.category.numpy()
        self.weight[idx] = cur.weights.numpy()
        self.cluster[idx] = cur.cluster.numpy()
        self.distance[idx] = cur.distance.numpy()
