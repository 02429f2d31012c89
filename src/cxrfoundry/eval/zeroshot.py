"""Zero-shot findings classification with a CLIP model (CheXficient's protocol).

For every finding the text tower embeds a positive and a negative prompt: by default CLIP's
prompt ensemble, the mean of the normalised embeddings of a few templates
(:data:`DEFAULT_PROMPTS`: ``"edema."``, ``"there is edema."``, … against ``"no edema."``,
``"there is no edema."``, …), which on the demo's validation split beat the
single pair ``"{finding}"`` / ``"no {finding}"`` (docs/clip.md). An image's score is the
softmax over the pair of its (scaled) similarities, positive side. Per
finding, AUROC over the eval split's images (label 1 = positive; 0 or unmentioned = negative;
uncertain = left out of that finding), and the mean over findings that have at least
``min_per_class`` positives and negatives. The confidence interval is a percentile bootstrap
over *patients* (resampled with replacement, seeded), so images of one patient move together.

Output (DESIGN.md section 3): ``{task, model, dataset, metric, value, ci_low, ci_high, n,
per_class}`` plus ``details`` (prompts, counts, findings left out and why).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from cxrfoundry import io as cio
from cxrfoundry.schema import FINDING_COLUMN_BY_NAME, FINDING_NAMES

log = logging.getLogger(__name__)

DEFAULT_EXCLUDE = ("No Finding",)  # "no No Finding" is not a sentence


def _device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def encode_split(
    model: Any,
    shards_dir: str | Path,
    split: str,
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
    columns: Sequence[str] = (),
) -> tuple[torch.Tensor, torch.Tensor, pa.Table]:
    """(image embeddings, report embeddings, metadata table) of every row of ``split``.

    The table holds ``image_id``, ``patient_id``, ``report`` and ``columns``, row-aligned with
    the embeddings (:class:`~cxrfoundry.data.dataset.ShardDataset` order).
    """
    from cxrfoundry.data.dataset import ShardDataset
    from cxrfoundry.train.clip import read_split_table

    device = device or _device()
    model = model.to(device).eval()
    table = read_split_table(
        Path(shards_dir), split, ["image_id", "patient_id", "report", *columns]
    )
    data = ShardDataset(shards_dir, split, cache_row_groups=4)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=lambda rows: (
            torch.stack([r["image"] for r in rows]),
            [r["report"] for r in rows],
        ),
    )
    images, texts = [], []
    for pixels, reports in tqdm(loader, desc=f"encode {split}", leave=False):
        images.append(model.encode_image(model.preprocess_images(pixels.to(device))).float().cpu())
        tok = model.tokenize(reports)
        texts.append(model.encode_text(**{k: v.to(device) for k, v in tok.items()}).float().cpu())
    if not images:
        raise ValueError(f"{shards_dir}: split {split!r} is empty")
    return torch.cat(images), torch.cat(texts), table


#: Prompt templates (``{finding}``: the name as written, ``{lower}``: lower case). Chosen on the
#: demo's *validation* split among single pairs and ensembles (docs/clip.md, "Zero-shot prompts").
DEFAULT_PROMPTS: dict[str, tuple[str, ...]] = {
    "positive": ("{lower}.", "there is {lower}.", "findings consistent with {lower}."),
    "negative": ("no {lower}.", "there is no {lower}.", "no evidence of {lower}."),
}


def finding_prompts(
    finding: str, templates: Mapping[str, Sequence[str]] | None = None
) -> tuple[list[str], list[str]]:
    """The (positive, negative) prompt lists of ``finding`` from ``templates``."""
    templates = templates or DEFAULT_PROMPTS
    out = []
    for side in ("positive", "negative"):
        side_templates = list(templates.get(side) or ())
        if not side_templates:
            raise ValueError(f"zero-shot prompts: no {side!r} template")
        try:
            out.append([t.format(finding=finding, lower=finding.lower()) for t in side_templates])
        except (KeyError, IndexError) as exc:
            raise ValueError(
                f"zero-shot prompts: template in {side_templates} uses an unknown field {exc}; "
                "only {finding} and {lower} exist"
            ) from None
    return out[0], out[1]


@torch.no_grad()
def zeroshot_scores(
    model: Any,
    images: torch.Tensor,
    findings: Sequence[str],
    templates: Mapping[str, Sequence[str]] | None = None,
) -> np.ndarray:
    """(N, F) positive-prompt probabilities of normalised image embeddings ``images``.

    Each side's embedding is the unit-norm mean of its prompts' unit-norm embeddings (CLIP's
    ensemble); every prompt is encoded in one batch.
    """
    sides = [side for f in findings for side in finding_prompts(f, templates)]  # pos, neg, ...
    device = next(model.parameters()).device
    tok = model.tokenize([p for side in sides for p in side])
    text = model.encode_text(**{k: v.to(device) for k, v in tok.items()}).float().cpu()
    per_side = torch.split(F.normalize(text, dim=-1), [len(side) for side in sides])
    text = F.normalize(torch.stack([e.mean(0) for e in per_side]), dim=-1)  # (2F, D)
    logits = float(model.scale()) * images @ text.t()  # (N, 2F)
    pair = logits.view(images.shape[0], len(findings), 2)
    return torch.softmax(pair, dim=-1)[..., 0].numpy()


def _auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    if y.min() == y.max():
        return None
    return float(roc_auc_score(y, s))


def bootstrap_ci(
    groups: np.ndarray,
    statistic: Any,
    *,
    n_boot: int,
    seed: int,
    alpha: float = 0.05,
) -> tuple[float | None, float | None]:
    """Percentile CI of ``statistic(row_indices)`` over resampled groups (e.g. patients)."""
    if n_boot <= 0:
        return None, None
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), size=len(uniq))
        rows = np.concatenate([members[g] for g in pick])
        value = statistic(rows)
        if value is not None and np.isfinite(value):
            values.append(value)
    if not values:
        return None, None
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def zeroshot_eval(
    model_dir: str | Path,
    shards_dir: str | Path,
    out_path: str | Path,
    *,
    split: str = "test",
    findings: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    min_per_class: int = 5,
    n_boot: int = 200,
    seed: int = 0,
    model_name: str = "clip",
    batch_size: int = 64,
    device: str = "auto",
    prompts: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Zero-shot AUROC per finding and their mean; writes ``out_path`` and returns the record.

    ``prompts``: ``{"positive": [...], "negative": [...]}`` templates (default
    :data:`DEFAULT_PROMPTS`).
    """
    from cxrfoundry.models.clip import CLIPModel

    names = [f for f in (findings or FINDING_NAMES) if f not in set(exclude)]
    unknown = sorted(set(names) - set(FINDING_NAMES))
    if unknown:
        raise ValueError(f"zero-shot: unknown findings {unknown} (see cxrfoundry.schema)")
    model = CLIPModel.from_pretrained(model_dir)
    cols = [FINDING_COLUMN_BY_NAME[f] for f in names]
    images, _, table = encode_split(
        model, shards_dir, split, batch_size=batch_size, device=_device(device), columns=cols
    )
    scores = zeroshot_scores(model, images, names, prompts)
    per_class: dict[str, float | None] = {}
    used_prompts = {}
    for name in names:
        positive, negative = finding_prompts(name, prompts)
        used_prompts[name] = {"positive": positive, "negative": negative}
    details: dict[str, Any] = {"prompts": used_prompts, "counts": {}}
    labels, valid, used = {}, {}, []
    for j, (name, col) in enumerate(zip(names, cols, strict=True)):
        raw = np.array([np.nan if v is None else v for v in table.column(col).to_pylist()])
        ok = raw != -1  # uncertain left out; null (unmentioned) counts as negative
        y = (raw == 1).astype(int)
        n_pos, n_neg = int(y[ok].sum()), int((1 - y[ok]).sum())
        details["counts"][name] = {"positive": n_pos, "negative": n_neg}
        labels[name], valid[name] = y, ok
        if min(n_pos, n_neg) < min_per_class:
            per_class[name] = None
            continue
        per_class[name] = _auroc(y[ok], scores[ok, j])
        used.append(j)
    if not used:
        raise ValueError(
            f"{shards_dir}: no finding has {min_per_class}+ positives and negatives in {split!r}"
        )

    def mean_auroc(rows: np.ndarray) -> float | None:
        vals = []
        for j in used:
            name = names[j]
            r = rows[valid[name][rows]]
            a = _auroc(labels[name][r], scores[r, j]) if len(r) else None
            if a is not None:
                vals.append(a)
        return float(np.mean(vals)) if vals else None

    value = float(np.mean([per_class[names[j]] for j in used]))
    patients = np.array(table.column("patient_id").to_pylist())
    ci_low, ci_high = bootstrap_ci(patients, mean_auroc, n_boot=n_boot, seed=seed)
    details["findings_used"] = [names[j] for j in used]
    details["min_per_class"] = min_per_class
    details["bootstrap"] = {"unit": "patient", "n_boot": n_boot, "seed": seed}
    record = {
        "task": "zeroshot",
        "model": model_name,
        "dataset": Path(shards_dir).name,
        "split": split,
        "metric": "mean_auroc",
        "value": value,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "n": len(table),
        "per_class": per_class,
        "details": details,
    }
    cio.write_json(out_path, record)
    log.info("zero-shot mean AUROC %.4f over %d findings (n=%d)", value, len(used), len(table))
    return record


def summarize(record: Mapping[str, Any]) -> str:
    """One line for logs: mean AUROC with CI."""
    ci = record.get("ci_low"), record.get("ci_high")
    ci_txt = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if None not in ci else ""
    return f"{record['model']} {record['metric']}={record['value']:.4f}{ci_txt} n={record['n']}"
