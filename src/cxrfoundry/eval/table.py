"""The benchmark table: every metrics JSON under ``results/benchmarks`` in one CSV and one page.

:func:`benchmark_table` reads ``{root}/{model}/{task}.json`` (the contract of DESIGN.md
section 3, checked by :func:`cxrfoundry.eval.metrics.read_metrics`; a broken file is an error
naming it), adds each model's pretraining compute (FLOPs) and samples seen — from the record's
own ``compute.pretrain_flops`` / ``samples_seen`` keys, else from
``{models_dir}/{model}/metrics.json`` (``total_flops``, ``samples_seen``) — and writes:

* ``summary.csv``: one row per (model, task, dataset) with value and CI;
* ``summary.md``: a model × task grid of ``value [ci_low, ci_high]`` per dataset, the long table
  with metric names and n, and the compute per model.
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


def render_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The ``summary.md`` text of :func:`summary_rows` output."""
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
    return "\n".join(parts)


def benchmark_table(
    root: str | Path,
    out_csv: str | Path,
    out_md: str | Path,
    *,
    models_dir: str | Path | None = "results/models",
    records: Sequence[str | Path] | None = None,
) -> list[dict[str, Any]]:
    """Collect the metrics JSONs (all under ``root``, or exactly ``records``) and write the CSV
    and Markdown summaries atomically; returns the rows."""
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
    cio.write_text(out_md, render_markdown(rows))
    log.info("benchmark table: %d results -> %s, %s", len(rows), out_csv, out_md)
    return rows
