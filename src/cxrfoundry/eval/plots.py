"""Figures of the benchmark report, each computed from a results file (matplotlib, Agg).

* :func:`roc_curves` — per-finding ROC curves from a probe predictions table.
* :func:`fairness_bars` — subgroup metric with CIs per attribute: real test, synthetic cohort,
  and after balancing, from a fairness metrics JSON.
* :func:`utility_plot` — augmentation (AUROC per arm over seeds) and synthetic pretraining
  (AUROC vs real fraction) from their metrics JSONs.
* :func:`sample_grid` — real vs synthetic images side by side from two shard sets.
* :func:`table_figure` — the benchmark summary rows as a figure.

PNG files are written atomically with fixed metadata so reruns are byte-identical.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cxrfoundry import io as cio
from cxrfoundry.eval import metrics as M

log = logging.getLogger(__name__)


def save(fig: Any, path: str | Path) -> None:
    """Write ``fig`` as PNG atomically (no timestamp or version metadata), then close it."""
    with cio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)


def roc_curves(predictions: str | Path, out_png: str | Path, *, title: str = "") -> None:
    """One ROC panel per finding with both classes among the valid test labels."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from cxrfoundry.eval.probe import read_predictions
    from cxrfoundry.schema import FINDING_NAME_BY_COLUMN

    table, columns = read_predictions(predictions)
    panels = []
    for col in columns:
        y = np.asarray(table.column(f"label.{col}").to_numpy(zero_copy_only=False)) > 0
        ok = np.asarray(table.column(f"valid.{col}").to_numpy(zero_copy_only=False), bool)
        s = np.asarray(table.column(f"score.{col}").to_numpy(zero_copy_only=False), float)
        if ok.any() and 0 < y[ok].sum() < ok.sum():
            panels.append((FINDING_NAME_BY_COLUMN.get(col, col), y[ok], s[ok]))
    if not panels:
        raise ValueError(f"{predictions}: no finding has both classes; no ROC curve to draw")
    ncols = min(4, len(panels))
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, (name, y, s) in zip(axes.flat, panels, strict=False):
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1.5, label=f"AUROC {roc_auc_score(y, s):.3f}")
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
        ax.set_title(f"{name} (n+={int(y.sum())})", fontsize=9)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.legend(loc="lower right", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save(fig, out_png)


def _bars(
    ax: Any, rows: Sequence[Mapping[str, Any]], offset: float, width: float, label: str, color: str
):
    rows = [r for r in rows if r.get("value") is not None]
    x = np.arange(len(rows)) + offset
    values = np.array([r["value"] for r in rows], float)
    low = np.array([r["value"] - (r.get("ci_low") or r["value"]) for r in rows], float)
    high = np.array([(r.get("ci_high") or r["value"]) - r["value"] for r in rows], float)
    ax.bar(x, values, width, yerr=[low, high], capsize=3, label=label, color=color)
    return [r["group"] for r in rows]


def fairness_bars(record: Mapping[str, Any] | str | Path, out_png: str | Path) -> None:
    """Bars with 95% CIs per subgroup, one panel per single attribute."""
    rec = M.read_metrics(record) if isinstance(record, str | Path) else record
    metric = str(rec["metric"]).split("_gap_")[0]
    real = [r for r in rec["subgroups"] if "&" not in r["attribute"]]
    attributes = sorted({r["attribute"] for r in real})
    synth = (rec.get("synthetic") or {}).get("subgroups") or []
    mitigation = rec.get("mitigation") or {}
    fig, axes = plt.subplots(
        1, len(attributes), figsize=(4.2 * len(attributes), 3.6), squeeze=False
    )
    for ax, attr in zip(axes[0], attributes, strict=True):
        series = [("real test", [r for r in real if r["attribute"] == attr])]
        if synth:
            series.append(("synthetic test", [r for r in synth if r["attribute"] == attr]))
        if attr in mitigation and mitigation[attr].get("subgroups_after"):
            series.append(("real test, balanced training", mitigation[attr]["subgroups_after"]))
        groups = sorted({r["group"] for _, rows in series for r in rows if r["value"] is not None})
        width = 0.8 / len(series)
        for k, (label, rows) in enumerate(series):
            by = {r["group"]: r for r in rows}
            drawn = False
            aligned = [by.get(g, {"group": g, "value": None}) for g in groups]
            # Keep positions aligned across series: missing groups draw no bar.
            for i, row in enumerate(aligned):
                if row.get("value") is None:
                    continue
                _bars(
                    ax,
                    [row],
                    i + (k - (len(series) - 1) / 2) * width,
                    width,
                    label if not drawn else "_",
                    f"C{k}",
                )
                drawn = True
        if not groups:
            ax.text(0.5, 0.5, "no subgroup with enough patients", ha="center", fontsize=8,
                    transform=ax.transAxes)  # fmt: skip
        ax.set_xticks(np.arange(len(groups)))
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_title(attr)
        ax.set_ylabel(f"macro {metric}")
        ax.set_ylim(0.0, 1.05)
        ax.axhline(0.5, ls=":", color="grey", lw=0.8)
        if groups:
            ax.legend(fontsize=7, loc="lower right")
    r = (rec.get("correlation") or {}).get("pearson_r")
    fig.suptitle(
        f"{rec['model']} on {rec['dataset']}: subgroup {metric} (95% CI)"
        + (f" — real vs synthetic Pearson r = {r:.2f}" if r is not None else ""),
        fontsize=10,
    )
    fig.tight_layout()
    save(fig, out_png)


def utility_plot(
    augment: Mapping[str, Any] | str | Path | None,
    pretrain: Mapping[str, Any] | str | Path | None,
    out_png: str | Path,
) -> None:
    """Left: macro AUROC per augmentation arm (points = seeds). Right: AUROC vs real fraction
    with and without synthetic pretraining (error bars = patient-bootstrap CIs)."""
    load = lambda r: M.read_metrics(r) if isinstance(r, str | Path) else r  # noqa: E731
    aug, pre = (load(augment) if augment else None), (load(pretrain) if pretrain else None)
    panels = [p for p in (aug, pre) if p]
    if not panels:
        raise ValueError("utility_plot needs an augmentation or a pretraining record")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    k = 0
    if aug:
        ax = axes[0][k]
        arms = list(aug["summary"])
        for i, arm in enumerate(arms):
            values = [r["auroc"]["value"] for r in aug["runs"] if r["arm"] == arm]
            ax.scatter(np.full(len(values), i), values, s=14, alpha=0.7)
            ax.hlines(np.mean(values), i - 0.25, i + 0.25, color="black")
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms)
        ax.set_ylabel("macro AUROC (real test)")
        notes = ", ".join(
            f"{a}: Δ={c['mean_diff']:+.3f}, p={c['t_pvalue']:.3g}"
            if c["t_pvalue"] is not None
            else f"{a}: Δ={c['mean_diff']:+.3f}"
            for a, c in aug["comparisons"].items()
        )
        ax.set_title(f"augmentation ({len(aug['seeds'])} seeds)\n{notes}", fontsize=8)
        k += 1
    if pre:
        ax = axes[0][k]
        for arm in sorted({r["arm"] for r in pre["runs"]}):
            rows = sorted((r for r in pre["runs"] if r["arm"] == arm), key=lambda r: r["fraction"])
            x = [100 * r["fraction"] for r in rows]
            y = [r["auroc"]["value"] for r in rows]
            err = [
                [v - (r["auroc"]["ci_low"] or v) for v, r in zip(y, rows, strict=True)],
                [(r["auroc"]["ci_high"] or v) - v for v, r in zip(y, rows, strict=True)],
            ]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arm)
        ax.set_xscale("log")
        ax.set_xlabel("% of real training patients")
        ax.set_ylabel("macro AUROC (real test)")
        ax.set_title(f"synthetic pretraining ({pre['n_synthetic_pretrain']} images)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out_png)


def sample_grid(
    real: str | Path,
    synthetic: str | Path | None,
    out_png: str | Path,
    *,
    n: int = 8,
    real_split: str | None = "test",
) -> None:
    """First ``n`` images of the real split (top row) and of the synthetic cohort (bottom)."""
    from cxrfoundry.data.dataset import ShardDataset
    from cxrfoundry.eval.probe import resolve_shards

    rows = [("real", ShardDataset(resolve_shards(real, real_split)))]
    if synthetic is not None:
        rows.append(("synthetic", ShardDataset(resolve_shards(synthetic, None))))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.4 * n, 1.6 * len(rows)), squeeze=False)
    for r, (label, ds) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(ds):
                sample = ds[c]
                ax.imshow(sample["image"][0].numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"{label}\n{sample['sex'] or '?'} {sample['age']:.0f}", fontsize=6)
    fig.tight_layout()
    save(fig, out_png)


def table_figure(
    rows: Sequence[Mapping[str, Any]], out_png: str | Path, *, title: str = ""
) -> None:
    """The benchmark rows (model, task, dataset, value [CI], n) as a rendered table."""
    from cxrfoundry.eval.table import cell

    body = [[r["model"], r["task"], r["dataset"], r["metric"], cell(r), str(r["n"])] for r in rows]
    height = 0.8 + 0.28 * max(1, len(body))
    fig, ax = plt.subplots(figsize=(10, height))
    ax.axis("off")
    if body:
        tbl = ax.table(
            cellText=body,
            colLabels=["model", "task", "dataset", "metric", "value [95% CI]", "n"],
            loc="center",
        )
        tbl.auto_set_font_size(False)
        tbl.set_fontsize(8)
        tbl.scale(1, 1.2)
    else:
        ax.text(0.5, 0.5, "no results", ha="center")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    save(fig, out_png)
