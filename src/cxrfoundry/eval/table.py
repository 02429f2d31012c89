"""The benchmark table: every metrics JSON under ``results/benchmarks`` in one CSV and one page.

:func:`benchmark_table` reads ``{root}/{model}/{task}.json`` (the contract of DESIGN.md
section 3, checked by :func:`cxrfoundry.eval.metrics.read_metrics`; a broken file is an error
naming it), adds each model's pretraining compute (FLOPs) and samples seen — from the record's
own ``compute.pretrain_flops`` / ``samples_seen`` keys, else from
``{models_dir}/{model}/metrics.json`` (``total_flops``, ``samples_seen``) — and writes:

* ``summary.csv``: one row per (model, task, dataset) with value and CI;
* ``summary.md``: a model × task grid of ``value [ci_low, ci_high]`` per dataset, the long table
  with metric names and n, the compute per model and, given the probes' predictions tables, each
  backbone's macro AUROC gain over the random-init baseline with a *paired* patient-bootstrap CI
  (:func:`paired_gains`: both models scored on the same resamples of the same test images).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cxrfoundry import io as cio
from cxrfoundry.eval import metrics as M

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = (
    "model",
    "task",
    "dataset",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "pretrain_flops",
    "samples_seen",
    "file",
)


def collect_metrics(root: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``{root}/{model}/{task}.json`` with its validated record, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: benchmarks folder not found")
    out = []
    for path in sorted(root.glob("*/*.json")):
        record = M.read_metrics(path)
        if record["model"] != path.parent.name:
            log.warning("%s: model %r differs from its folder name", path, record["model"])
        out.append((path, record))
    return out


def _model_metrics(models_dir: Path | None, model: str) -> Mapping[str, Any]:
    if models_dir is None:
        return {}
    path = models_dir / model / "metrics.json"
    return cio.read_json(path) if path.is_file() else {}


def summary_rows(
    records: Sequence[tuple[Path, Mapping[str, Any]]], models_dir: str | Path | None = None
) -> list[dict[str, Any]]:
    """Table rows (keys :data:`COLUMNS`), sorted by task, dataset, model."""
    models = Path(models_dir) if models_dir is not None else None
    rows = []
    for path, rec in records:
        compute = rec.get("compute") if isinstance(rec.get("compute"), Mapping) else {}
        model_metrics = _model_metrics(models, rec["model"])
        flops = compute.get("pretrain_flops")
        if flops is None:
            flops = model_metrics.get("total_flops")
        seen = rec.get("samples_seen")
        if seen is None:
            seen = model_metrics.get("samples_seen")
        rows.append(
            {
                "model": rec["model"],
                "task": rec["task"],
                "dataset": rec["dataset"],
                "metric": rec["metric"],
                "value": rec["value"],
                "ci_low": rec["ci_low"],
                "ci_high": rec["ci_high"],
                "n": rec["n"],
                "pretrain_flops": flops,
                "samples_seen": seen,
                "file": str(path),
            }
        )
    rows.sort(key=lambda r: (r["task"], r["dataset"], r["model"]))
    return rows


def _predictions_key(path: Path) -> tuple[str, str, str]:
    """(model, task, dataset) of ``{model}/predictions/{task}.{dataset}.parquet``."""
    task, _, dataset = path.name.removesuffix(".parquet").partition(".")
    return path.parent.parent.name, task, dataset


def _matrix(table: Any, prefix: str, columns: Sequence[str]) -> Any:
    """``(n, k)`` array of the ``{prefix}.{column}`` columns of a predictions table."""
    import numpy as np

    return np.stack(
        [np.asarray(table.column(f"{prefix}.{c}").to_numpy(zero_copy_only=False)) for c in columns],
        axis=1,
    )


def paired_gains(
    predictions: Sequence[str | Path],
    *,
    baseline_suffix: str = "random",
    n_boot: int = M.DEFAULT_N_BOOT,
    seed: int = 0,
    alpha: float = 0.05,
) -> list[dict[str, Any]]:
    """Macro AUROC of each model minus the random-init baseline's, per (task, dataset).

    ``predictions`` are probe predictions tables (``{model}/predictions/{task}.{dataset}
    .parquet``). Pairs share the test images (checked), so :func:`metrics.paired_difference`
    scores both on the same patient-bootstrap replicates: the CI is that of the difference, not
    two overlapping intervals.
    """
    import numpy as np

    from cxrfoundry.eval.probe import read_predictions

    groups: dict[tuple[str, str], dict[str, Path]] = {}
    for path in map(Path, predictions):
        model, task, dataset = _predictions_key(path)
        groups.setdefault((task, dataset), {})[model] = path
    rows = []
    for (task, dataset), by_model in sorted(groups.items()):
        baselines = sorted(m for m in by_model if m.endswith(baseline_suffix))
        if not baselines:
            continue
        base_name = baselines[0]
        base, columns = read_predictions(by_model[base_name])
        for model, path in sorted(by_model.items()):
            if model == base_name:
                continue
            table, other_columns = read_predictions(path)
            if other_columns != columns or table.column("image_id") != base.column("image_id"):
                raise ValueError(f"{path} and {by_model[base_name]}: different test images")

            diff = M.paired_difference(
                _matrix(table, "score", columns).astype(float),
                _matrix(base, "score", columns).astype(float),
                _matrix(base, "label", columns) > 0,
                np.asarray(base.column("patient_id").to_pylist(), dtype=object),
                valid=_matrix(base, "valid", columns).astype(bool),
                n_boot=n_boot,
                seed=seed,
                alpha=alpha,
            )
            rows.append({"model": model, "baseline": base_name, "task": task, "dataset": dataset,
                         **diff})  # fmt: skip
    return rows


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def cell(row: Mapping[str, Any]) -> str:
    """``0.812 [0.781, 0.840]`` (or without CI when it is missing)."""
    text = _fmt(row["value"])
    if row["ci_low"] is not None and row["ci_high"] is not None:
        text += f" [{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]"
    return text


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def render_markdown(
    rows: Sequence[Mapping[str, Any]], gains: Sequence[Mapping[str, Any]] = ()
) -> str:
    """The ``summary.md`` text of :func:`summary_rows` (and :func:`paired_gains`) output."""
    parts = [
        "# Benchmark summary",
        "",
        "Values with 95% percentile bootstrap confidence intervals (resampled by patient where "
        "the producing stage supports it; see each JSON's `ci_method`). `–` = not available.",
        "",
    ]
    if not rows:
        return "\n".join([*parts, "No metrics files found.", ""])
    for dataset in sorted({r["dataset"] for r in rows}):
        subset = [r for r in rows if r["dataset"] == dataset]
        tasks = sorted({r["task"] for r in subset})
        models = sorted({r["model"] for r in subset})
        by = {(r["model"], r["task"]): r for r in subset}
        body = [[m] + [cell(by[(m, t)]) if (m, t) in by else "" for t in tasks] for m in models]
        parts += [f"## {dataset}: model × task", "", _md_table(["model", *tasks], body), ""]
    parts += ["## All results", ""]
    body = [[r["task"], r["dataset"], r["model"], r["metric"], cell(r), str(r["n"])] for r in rows]
    parts += [_md_table(["task", "dataset", "model", "metric", "value [95% CI]", "n"], body), ""]
    compute: dict[str, tuple[Any, Any]] = {}
    for r in rows:
        flops, seen = compute.get(r["model"], (None, None))
        compute[r["model"]] = (
            flops if flops is not None else r["pretrain_flops"],
            seen if seen is not None else r["samples_seen"],
        )
    body = [[m, _fmt(f, ".3g"), _fmt(s)] for m, (f, s) in sorted(compute.items())]
    parts += [
        "## Pretraining compute",
        "",
        _md_table(["model", "pretraining FLOPs", "samples seen"], body),
        "",
    ]
    if gains:
        body = [
            [g["task"], g["dataset"], g["model"], g["baseline"], f"{g['value']:+.3f}"
             + (f" [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]" if g["ci_low"] is not None else ""),
             _fmt(g["p_boot"])]
            for g in gains
        ]  # fmt: skip
        parts += [
            "## Gain over the random-init baseline",
            "",
            "Macro AUROC difference on the same test images with a paired patient-bootstrap "
            "95% CI (both models scored on the same resamples); `p` = two-sided bootstrap share.",
            "",
            _md_table(["task", "dataset", "model", "baseline", "gain [95% CI]", "p"], body),
            "",
        ]
    return "\n".join(parts)


def benchmark_table(
    root: str | Path,
    out_csv: str | Path,
    out_md: str | Path,
    *,
    models_dir: str | Path | None = "results/models",
    records: Sequence[str | Path] | None = None,
    predictions: Sequence[str | Path] = (),
    n_boot: int = M.DEFAULT_N_BOOT,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Collect the metrics JSONs (all under ``root``, or exactly ``records``) and write the CSV
    and Markdown summaries atomically; returns the rows. ``predictions`` (probe predictions
    tables) add the paired gains over the random-init baseline to ``summary.md``."""
    if records is not None:
        found = [(Path(p), M.read_metrics(p)) for p in sorted(map(str, records))]
    else:
        found = collect_metrics(root)
    rows = summary_rows(found, models_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
    cio.write_text(out_csv, buffer.getvalue())
    gains = paired_gains(predictions, n_boot=n_boot, seed=seed) if predictions else []
    cio.write_text(out_md, render_markdown(rows, gains))
    log.info("benchmark table: %d results -> %s, %s", len(rows), out_csv, out_md)
    return rows
