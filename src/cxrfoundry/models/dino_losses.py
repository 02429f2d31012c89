"""DINO, iBOT and KoLeo losses with teacher centering (EMA or Sinkhorn-Knopp).

All reductions that mix samples are distributed-aware: with ``torch.distributed`` initialised,
the teacher centre (EMA mode) and the Sinkhorn-Knopp normalisation use sums all-reduced over
ranks, so N processes with batch B/N each compute exactly what one process computes on batch B.
The losses themselves are means over the *local* batch; DDP's gradient averaging then gives the
global mean when every rank holds the same number of samples. KoLeo is the exception: as in
DINOv2 it looks for nearest neighbours within each rank's batch only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

CENTERINGS = ("ema", "sinkhorn")
CENTER_INITS = ("first_batch", "zero")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op in a single process); returns it."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp: rows sum to 1, prototypes get equal mass over the batch.

    ``logits`` is ``(n_samples, n_prototypes)`` on this rank (may be empty); the sample count and
    all marginals are summed over ranks. Returns float32 probabilities of the same shape.
    """
    logits = logits.float()
    n_local, k = logits.shape
    count = all_reduce_sum(torch.tensor([float(n_local)], device=logits.device))
    n_total = count.item()
    if n_total == 0:
        return logits.new_zeros(logits.shape)
    # Subtracting the global max keeps exp() finite at teacher temperatures of ~0.04.
    peak = logits.max() if n_local else logits.new_tensor(float("-inf"))
    if _distributed():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    q = torch.exp((logits - peak) / temperature).t()  # (k, n)
    total = all_reduce_sum(q.sum().reshape(1))
    q = q / total
    for _ in range(n_iterations):
        rows = all_reduce_sum(q.sum(dim=1, keepdim=True))
        q = q / rows / k
        q = q / q.sum(dim=0, keepdim=True) / n_total
    return (q * n_total).t()


class Centering(nn.Module):
    """Turns teacher logits into target probabilities, by EMA centering or Sinkhorn-Knopp.

    ``mode="ema"`` (CXformer): ``softmax((logits - center) / T)`` with ``center`` an EMA (momentum
    ``momentum``, 0.9 in CXformer) of the batch-mean teacher logits, updated after use.
    ``mode="sinkhorn"`` (stock DINOv2): :func:`sinkhorn_knopp`; the centre is still tracked for
    diagnostics but does not change the targets.

    ``init="first_batch"`` (default) sets the centre to the first batch's mean logits before that
    batch is used; ``init="zero"`` is DINO's zero start. With a zero start the first
    ~``1 / (1 - momentum)`` steps see *uncentred* targets that put every image on the same
    prototype; DINO's 10-epoch lr warm-up makes that harmless, but in a short run the student
    learns that common mode and the representation collapses (uniform targets) for good.
    """

    def __init__(
        self, n_prototypes: int, mode: str = "ema", momentum: float = 0.9, init: str = "first_batch"
    ) -> None:
        super().__init__()
        if mode not in CENTERINGS:
            raise ValueError(f"unknown centering {mode!r}; expected one of {CENTERINGS}")
        if init not in CENTER_INITS:
            raise ValueError(f"unknown center init {init!r}; expected one of {CENTER_INITS}")
        self.mode = mode
        self.momentum = float(momentum)
        self.register_buffer("center", torch.zeros(1, n_prototypes))
        # A buffer (not a Python flag) so that checkpoints and resume carry it.
        self.register_buffer("initialized", torch.tensor(init == "zero"))

    @torch.no_grad()
    def targets(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Teacher probabilities (float32) for ``logits`` of shape ``(n, n_prototypes)``."""
        if self.mode == "sinkhorn":
            return sinkhorn_knopp(logits, temperature)
        self._init_from(logits)
        return F.softmax((logits.float() - self.center) / temperature, dim=-1)

    def _init_from(self, logits: torch.Tensor) -> None:
        """``init="first_batch"``: set the centre to the first (non-empty) batch's mean."""
        if bool(self.initialized):
            return
        mean = self._batch_mean(logits)
        if mean is not None:
            self.center.copy_(mean)
            self.initialized.fill_(True)

    @staticmethod
    def _batch_mean(logits: torch.Tensor) -> torch.Tensor | None:
        """Mean of ``logits`` over the samples of all ranks; None when there are none."""
        stats = torch.cat(
            [logits.float().sum(dim=0), logits.new_tensor([logits.shape[0]], dtype=torch.float32)]
        )
        stats = all_reduce_sum(stats)
        n = stats[-1]
        if n.item() == 0:
            return None
        return (stats[:-1] / n).unsqueeze(0)

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> None:
        """EMA update of the centre with the (all-rank) mean of ``logits``; skips empty batches."""
        self._init_from(logits)
        batch_center = self._batch_mean(logits)
        if batch_center is None:
            return
        self.center.mul_(self.momentum).add_(batch_center, alpha=1 - self.momentum)


def cross_entropy(targets: torch.Tensor, student_logits: torch.Tensor, temperature: float):
    """Per-row ``-sum(targets * log_softmax(student / T))`` in float32."""
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(targets * log_probs).sum(dim=-1)


def dino_loss(
    teacher_targets: torch.Tensor,
    student_global: torch.Tensor,
    student_local: torch.Tensor | None,
    *,
    n_global: int,
    student_temperature: float = 0.1,
) -> torch.Tensor:
    """DINO CLS loss averaged over (teacher crop, different student crop) pairs and samples.

    Tensors are crop-major: ``teacher_targets`` and ``student_global`` are ``(n_global * B, K)``
    (crop 0 for all samples, then crop 1, ...), ``student_local`` is ``(n_local * B, K)``.
    """
    teacher = teacher_targets.chunk(n_global)
    students = list(student_global.chunk(n_global))
    if student_local is not None and student_local.shape[0]:
        students += list(student_local.chunk(student_local.shape[0] // teacher[0].shape[0]))
    total = student_global.new_zeros((), dtype=torch.float32)
    pairs = 0
    for ti, t in enumerate(teacher):
        for si, s in enumerate(students):
            if si == ti:
                continue  # a crop is never its own target
            total = total + cross_entropy(t, s, student_temperature).mean()
            pairs += 1
    return total / max(pairs, 1)


def ibot_loss(
    teacher_targets: torch.Tensor,
    student_logits: torch.Tensor,
    masks: torch.Tensor,
    *,
    student_temperature: float = 0.1,
) -> torch.Tensor:
    """iBOT masked-patch loss.

    ``masks`` is the bool ``(n_images, n_patches)`` mask of the global crops; ``teacher_targets``
    and ``student_logits`` hold one row per masked patch, in ``masks[masks]`` order. Each image's
    masked patches share weight 1 (so large masks do not dominate), and the sum is divided by the
    number of images, masked or not (a fixed local denominator keeps DDP averaging exact).
    """
    n_images = masks.shape[0]
    per_image = masks.sum(dim=1).clamp(min=1).float()
    weights = (1.0 / per_image).unsqueeze(1).expand_as(masks)[masks]
    losses = cross_entropy(teacher_targets, student_logits, student_temperature)
    return (losses * weights).sum() / max(n_images, 1)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser: ``-mean(log(distance to nearest neighbour))``.

    Spreads the (L2-normalised) features of a batch; computed within this rank's batch.
    """
    x = F.normalize(features.float(), dim=-1, eps=eps)
    if x.shape[0] < 2:
        return x.sum() * 0.0
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        neighbour = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[neighbour], eps=eps)
    return -torch.log(distances + eps).mean()
