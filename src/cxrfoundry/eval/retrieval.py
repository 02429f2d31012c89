"""Image <-> report retrieval Recall@K with a CLIP model.

Every image of the eval split queries every report of the split (image->text) and every report
queries every image (text->image). A query is a hit at K when one of its top-K results is its
pair *or an identical report* (template reports can repeat word for word; an exact duplicate is
as correct an answer as the paired copy). Chance level is computed exactly for the same
duplicate structure: a random ranking hits with probability 1 - C(N-m, K) / C(N, K), m = the
number of correct items. The headline ``value`` is the mean of image->text and text->image R@10;
the CI is a percentile bootstrap over patients (seeded).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import gammaln

from cxrfoundry import io as cio
from cxrfoundry.eval.zeroshot import _device, bootstrap_ci, encode_split

log = logging.getLogger(__name__)

KS = (1, 5, 10)


def _hits(sim: torch.Tensor, correct: torch.Tensor, k: int) -> np.ndarray:
    """Per-query hit@k: any of the top-k columns of ``sim`` is marked in ``correct``."""
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices
    return correct.gather(1, top).any(dim=1).numpy()


def _chance(m: np.ndarray, n: int, k: int) -> float:
    """Mean probability that a random top-k out of ``n`` contains one of ``m`` correct items."""
    k = min(k, n)
    # log C(n-m, k) - log C(n, k); C(n-m, k) = 0 when n - m < k.
    miss = np.where(
        n - m >= k,
        np.exp(gammaln(n - m + 1) - gammaln(n - m - k + 1) - gammaln(n + 1) + gammaln(n - k + 1)),
        0.0,
    )
    return float(np.mean(1.0 - miss))


def recall_at_k(
    images: torch.Tensor, texts: torch.Tensor, reports: list[str], ks: tuple[int, ...] = KS
) -> dict[str, np.ndarray]:
    """Per-query hit arrays ``i2t@k`` and ``t2i@k`` for normalised, row-paired embeddings."""
    codes = {r: i for i, r in enumerate(dict.fromkeys(reports))}
    ids = torch.tensor([codes[r] for r in reports])
    correct = ids[:, None] == ids[None, :]  # symmetric: same report text
    sim = images @ texts.t()
    out = {}
    for k in ks:
        out[f"i2t@{k}"] = _hits(sim, correct, k)
        out[f"t2i@{k}"] = _hits(sim.t(), correct, k)
    return out


def retrieval_eval(
    model_dir: str | Path,
    shards_dir: str | Path,
    out_path: str | Path,
    *,
    split: str = "test",
    n_boot: int = 200,
    seed: int = 0,
    model_name: str = "clip",
    batch_size: int = 64,
    device: str = "auto",
) -> dict[str, Any]:
    """Recall@1/5/10 both ways on ``split``; writes ``out_path`` and returns the record."""
    from cxrfoundry.models.clip import CLIPModel

    model = CLIPModel.from_pretrained(model_dir)
    images, texts, table = encode_split(
        model, shards_dir, split, batch_size=batch_size, device=_device(device)
    )
    reports = [r or "" for r in table.column("report").to_pylist()]
    hits = recall_at_k(images, texts, reports)
    n = len(reports)
    counts = np.unique(np.array(reports), return_inverse=True, return_counts=True)
    m = counts[2][counts[1]]
    per_class: dict[str, float] = {}
    for k in KS:
        per_class[f"image_to_text_R{k}"] = float(hits[f"i2t@{k}"].mean())
        per_class[f"text_to_image_R{k}"] = float(hits[f"t2i@{k}"].mean())
        per_class[f"chance_R{k}"] = _chance(m, n, k)
    both = (hits["i2t@10"].astype(float) + hits["t2i@10"].astype(float)) / 2
    patients = np.array(table.column("patient_id").to_pylist())
    ci_low, ci_high = bootstrap_ci(
        patients, lambda rows: float(both[rows].mean()), n_boot=n_boot, seed=seed
    )
    record = {
        "task": "retrieval",
        "model": model_name,
        "dataset": Path(shards_dir).name,
        "split": split,
        "metric": "recall@10_mean_i2t_t2i",
        "value": float(both.mean()),
        "ci_low": ci_low,
        "ci_high": ci_high,
        "n": n,
        "per_class": per_class,
        "details": {
            "unique_reports": len(counts[0]),
            "hit_rule": "top-k contains the pair or an identical report",
            "bootstrap": {"unit": "patient", "n_boot": n_boot, "seed": seed},
        },
    }
    cio.write_json(out_path, record)
    log.info(
        "retrieval R@10 i2t %.3f t2i %.3f (chance %.3f, n=%d)",
        per_class["image_to_text_R10"],
        per_class["text_to_image_R10"],
        per_class["chance_R10"],
        n,
    )
    return record
