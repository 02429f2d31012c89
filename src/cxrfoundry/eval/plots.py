"""Figures of the benchmark report, each computed from a results file (matplotlib, Agg).

* :func:`roc_curves` — per-finding ROC curves from a probe predictions table.
* :func:`fairness_bars` — subgroup metric with CIs per attribute: real test, synthetic cohort,
  and after balancing, from a fairness metrics JSON.
* :func:`utility_plot` — augmentation (AUROC per arm over seeds) and synthetic pretraining
  (AUROC vs real fraction) from their metrics JSONs.
* :func:`sample_grid` — real test images above the synthetic images generated from them
  (paired by ``source_image_id``) or, without pairs, the first synthetic images.
* :func:`curation_plot` — CheXficient's curator decisions from a CLIP model's
  ``subset.parquet``: categories per prototype cluster, distance to the prototype by category,
  and the dataset mix of the whole train split vs the kept subset.
* :func:`ablation_figure` — ablation tables: probe modes and segmentation heads per backbone,
  synthetic-data arms, and the DINO ablation when given.
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
    """Real test images (top row) and the synthetic images generated from them (bottom).

    A synthetic cohort with ``source_image_id`` is paired with its real sources (the first ``n``
    synthetic images whose source is in the real split); otherwise both rows show the first
    ``n`` images. Titles give sex, age and the first positive finding.
    """
    import pyarrow.parquet as pq

    from cxrfoundry.data.dataset import ShardDataset
    from cxrfoundry.eval.probe import resolve_shards
    from cxrfoundry.schema import FINDING_COLUMNS, FINDING_NAME_BY_COLUMN

    real_files = resolve_shards(real, real_split)
    real_ds = ShardDataset(real_files)
    real_ids = pq.read_table(real_files, columns=["image_id"]).column("image_id").to_pylist()
    columns: list[tuple[str, list[int | None]]] = [("real", list(range(min(n, len(real_ds)))))]
    synth_ds = None
    if synthetic is not None:
        synth_files = resolve_shards(synthetic, None)
        synth_ds = ShardDataset(synth_files)
        names = pq.read_schema(synth_files[0]).names
        position = {image_id: i for i, image_id in enumerate(real_ids)}
        if "source_image_id" in names:
            sources = pq.read_table(synth_files, columns=["source_image_id"]).column(0).to_pylist()
            pairs = [(position[s], j) for j, s in enumerate(sources) if s in position][:n]
        else:
            pairs = []
        if pairs:
            columns = [("real", [p[0] for p in pairs]), ("synthetic", [p[1] for p in pairs])]
        else:
            columns.append(("synthetic", list(range(min(n, len(synth_ds))))))
    width = max(len(idx) for _, idx in columns)
    fig, axes = plt.subplots(
        len(columns), max(1, width), figsize=(1.5 * max(1, width), 1.8 * len(columns)),
        squeeze=False,
    )  # fmt: skip
    for r, (label, indices) in enumerate(columns):
        ds = real_ds if label == "real" else synth_ds
        for c in range(axes.shape[1]):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(indices) or ds is None:
                continue
            sample = ds[indices[c]]
            labels = sample["labels"].numpy() if "labels" in sample else None
            finding = ""
            if labels is not None:
                positive = [FINDING_COLUMNS[k] for k in np.flatnonzero(labels > 0.5)]
                positive = [p for p in positive if p != "no_finding"]
                finding = FINDING_NAME_BY_COLUMN[positive[0]] if positive else "no finding"
            age = sample.get("age")
            age_text = "?" if age is None or not np.isfinite(float(age)) else f"{float(age):.0f}"
            ax.imshow(sample["image"][0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{label}\n{sample['sex'] or '?'} {age_text}\n{finding}", fontsize=6)
    fig.tight_layout()
    save(fig, out_png)


def curation_plot(model_dir: str | Path, out_png: str | Path) -> None:
    """CheXficient curation statistics of a CLIP model folder (``subset.parquet``)."""
    import pyarrow.parquet as pq

    model_dir = Path(model_dir)
    path = model_dir / "subset.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no curated subset (not a CLIP model folder?)")
    table = pq.read_table(path).to_pydict()
    category = np.asarray(table["category"], dtype=object)
    cluster = np.asarray(table["cluster"], dtype=np.int64)
    distance = np.asarray(table["distance"], dtype=np.float64)
    kept = np.asarray(table["kept"], dtype=bool)
    dataset = np.asarray([str(i).split("/", 1)[0] for i in table["image_id"]], dtype=object)
    metrics_path = model_dir / "metrics.json"
    metrics = cio.read_json(metrics_path) if metrics_path.is_file() else {}
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    order = [c for c in ("central_kept", "support", "central_dropped", "outlier", "warmup",
                         "unseen", "uncurated") if c in set(category)]  # fmt: skip
    clusters = sorted(set(cluster.tolist()))
    bottom = np.zeros(len(clusters))
    for k, name in enumerate(order):
        counts = np.array([np.sum((cluster == c) & (category == name)) for c in clusters])
        axes[0].bar([str(c) for c in clusters], counts, bottom=bottom, label=name, color=f"C{k}")
        bottom += counts
    axes[0].set_xlabel("prototype cluster")
    axes[0].set_ylabel("train images")
    axes[0].set_title("curator category per cluster", fontsize=9)
    axes[0].legend(fontsize=7)
    finite = np.isfinite(distance)
    for k, name in enumerate(order):
        values = distance[finite & (category == name)]
        if values.size:
            axes[1].hist(values, bins=30, alpha=0.6, label=name, color=f"C{k}")
    axes[1].set_xlabel("distance to the cluster prototype")
    axes[1].set_title("distance by category", fontsize=9)
    if finite.any():
        axes[1].legend(fontsize=7)
    names = sorted(set(dataset.tolist()))
    x = np.arange(len(names))
    share_all = np.array([np.mean(dataset == d) for d in names])
    share_kept = np.array([np.mean(dataset[kept] == d) if kept.any() else 0.0 for d in names])
    axes[2].bar(x - 0.2, share_all, 0.4, label=f"train split (n={len(kept)})")
    axes[2].bar(x + 0.2, share_kept, 0.4, label=f"kept subset (n={int(kept.sum())})")
    axes[2].set_xticks(x)
    axes[2].set_xticklabels(names, fontsize=7, rotation=20)
    axes[2].set_ylabel("share of images")
    axes[2].set_title("dataset mix before and after curation", fontsize=9)
    axes[2].legend(fontsize=7)
    seen = metrics.get("samples_seen")
    fig.suptitle(
        f"CLIP curation: {int(kept.sum())} of {len(kept)} train images kept "
        f"({kept.mean():.0%})" + (f"; {seen} samples seen in training" if seen else ""),
        fontsize=10,
    )
    fig.tight_layout()
    save(fig, out_png)


def ablation_rows(
    records: Sequence[Mapping[str, Any]], dino_ablation: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Ablation tables ``{title: (header, rows)}`` from metrics records.

    * classification: per backbone and dataset, the linear probe vs fine-tuning (and the DINO
      stage's ``cls``), value [CI];
    * segmentation: per backbone, each head (and the DINO stage's ``seg``);
    * synthetic data: augmentation arms and pretraining fractions;
    * the DINO ablation rows (``dino_ablation.json``) when given.
    """
    from cxrfoundry.eval.table import cell

    def grid(tasks: Sequence[str]) -> tuple[list[str], list[list[str]]]:
        by = {(r["model"], r["dataset"], r["task"]): r for r in records if r["task"] in tasks}
        keys = sorted({(m, d) for m, d, _ in by})
        present = [t for t in tasks if any(k[2] == t for k in by)]
        body = [
            [m, d] + [cell(by[(m, d, t)]) if (m, d, t) in by else "" for t in present]
            for m, d in keys
        ]
        return ["model", "dataset", *present], body

    out: dict[str, tuple[list[str], list[list[str]]]] = {}
    header, body = grid(["probe_linear", "probe_finetune", "cls"])
    if body:
        out["Classification: macro AUROC [95% CI] by training mode"] = (header, body)
    header, body = grid(["seg_linear", "seg_unet", "seg"])
    if body:
        out["Segmentation: mean Dice [95% CI] by head"] = (header, body)
    synth = []
    for r in records:
        if r["task"] == "augment":
            for arm, s in r.get("summary", {}).items():
                note = f"± {s['sd_auroc']:.3f} (sd over seeds)"
                synth.append([r["model"], "augmentation", arm, f"{s['mean_auroc']:.3f}", note])
        elif r["task"] == "synth_pretrain":
            for run in r.get("runs", []):
                arm = f"{run['arm']} @ {run['fraction']:g}"
                note = f"n_real={run['n_real']}"
                synth.append([r["model"], "pretraining", arm, cell(run["auroc"]), note])
    if synth:
        out["Synthetic data: macro AUROC on the real test split"] = (
            ["model", "experiment", "arm", "AUROC", "note"],
            synth,
        )
    if dino_ablation:
        body = []
        for row in dino_ablation:
            low, high = row.get("auroc_ci") or (None, None)
            gain = row.get("auroc_gain")
            body.append(
                [
                    str(row["model"]),
                    "–"
                    if row.get("num_register_tokens") is None
                    else str(row["num_register_tokens"]),
                    str(row.get("centering") or "–"),
                    cell({"value": row["auroc_mean"], "ci_low": low, "ci_high": high}),
                    "–" if gain is None else f"{gain:+.3f}",
                    "–" if row.get("dice_lungs") is None else f"{row['dice_lungs']:.3f}",
                ]
            )
        out["DINO ablation (rule dino_ablation)"] = (
            ["model", "registers", "centering", "AUROC [95% CI]", "vs random", "Dice lungs"],
            body,
        )
    return out


def ablation_figure(
    records: Sequence[Mapping[str, Any]],
    out_png: str | Path,
    *,
    dino_ablation: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """:func:`ablation_rows` rendered as stacked tables."""
    tables = ablation_rows(records, dino_ablation)
    heights = [0.6 + 0.3 * max(1, len(body)) for _, body in tables.values()] or [1.0]
    fig, axes = plt.subplots(
        len(heights), 1, figsize=(11, sum(heights) + 0.4), squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )  # fmt: skip
    if not tables:
        axes[0][0].axis("off")
        axes[0][0].text(0.5, 0.5, "no ablation results", ha="center")
    for ax, (title, (header, body)) in zip(axes[:, 0], tables.items(), strict=False):
        ax.axis("off")
        ax.set_title(title, fontsize=9)
        tbl = ax.table(cellText=body, colLabels=header, loc="center")
        tbl.auto_set_font_size(False)
        tbl.set_fontsize(7)
        tbl.scale(1, 1.15)
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
