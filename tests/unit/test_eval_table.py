"""Benchmark table collection and report figures (cxrfoundry.eval.table, eval.plots)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pytest

from cxrfoundry import io as cio
from cxrfoundry.eval import fairness as FA
from cxrfoundry.eval import metrics as M
from cxrfoundry.eval import plots, table


def _write(root, model, task, value, **extra) -> None:
    rec = M.metrics_record(
        task=task,
        model=model,
        dataset="demo",
        metric="auroc_macro",
        estimate=M.Estimate(value, value - 0.05, value + 0.05),
        n=100,
        per_class={},
        **extra,
    )
    M.write_metrics(root / model / f"{task}.json", rec)


def test_benchmark_table_collects_every_json(tmp_path) -> None:
    bench, models = tmp_path / "benchmarks", tmp_path / "models"
    _write(bench, "dino", "probe_linear", 0.81)
    _write(bench, "dino", "seg_linear", 0.9)
    _write(bench, "dino_random", "probe_linear", 0.6, compute={"pretrain_flops": 0.0})
    _write(bench, "clip", "probe_linear", 0.7, samples_seen=64)
    cio.write_json(models / "dino" / "metrics.json", {"total_flops": 3.5e15, "samples_seen": 1000})
    rows = table.benchmark_table(
        bench, bench / "summary.csv", bench / "summary.md", models_dir=models
    )
    assert len(rows) == 4
    with open(bench / "summary.csv", newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [r["model"] for r in read] == ["clip", "dino", "dino_random", "dino"]
    dino = next(r for r in read if r["model"] == "dino" and r["task"] == "probe_linear")
    assert float(dino["pretrain_flops"]) == 3.5e15 and dino["samples_seen"] == "1000"
    assert float(dino["ci_low"]) == pytest.approx(0.76)
    md = (bench / "summary.md").read_text()
    assert "| dino | 0.810 [0.760, 0.860] | 0.900 [0.850, 0.950] |" in md
    assert "| clip | – | 64 |" in md and "3.5e+15" in md
    # Deterministic rerun; a broken file is named in the error.
    first = (bench / "summary.csv").read_bytes()
    table.benchmark_table(bench, bench / "summary.csv", bench / "summary.md", models_dir=models)
    assert (bench / "summary.csv").read_bytes() == first
    (bench / "bad").mkdir()
    (bench / "bad" / "x.json").write_text(json.dumps({"task": "x"}))
    with pytest.raises(ValueError, match=r"bad/x\.json: missing keys"):
        table.collect_metrics(bench)


def _png_ok(path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_plots_from_results(tmp_path) -> None:
    rng = np.random.default_rng(0)
    n = 80
    y = rng.random((n, 2)) < 0.4
    s = y + rng.normal(0, 0.8, y.shape)
    cols = {"image_id": [f"i{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)]}
    for j, c in enumerate(["cardiomegaly", "edema"]):
        cols[f"label.{c}"] = y[:, j].astype(np.int8)
        cols[f"valid.{c}"] = np.ones(n, bool)
        cols[f"score.{c}"] = s[:, j]
    cio.write_parquet(tmp_path / "pred.parquet", pa.table(cols))
    plots.roc_curves(tmp_path / "pred.parquet", tmp_path / "roc.png", title="dino")
    _png_ok(tmp_path / "roc.png")
    first = (tmp_path / "roc.png").read_bytes()
    plots.roc_curves(tmp_path / "pred.parquet", tmp_path / "roc.png", title="dino")
    assert (tmp_path / "roc.png").read_bytes() == first  # byte-identical rerun

    sex = np.where(rng.random(n) < 0.5, "F", "M").astype(object)
    groups = {"sex": sex, "age": FA.age_groups(rng.integers(20, 90, n))}
    audit = FA.subgroup_audit(s, y, np.arange(n), groups, min_patients=5, n_boot=50)
    record = {
        "task": "fairness",
        "model": "dino",
        "dataset": "demo",
        "metric": "auroc_gap_sex",
        "value": audit.gaps["sex"]["gap"],
        "ci_low": None,
        "ci_high": None,
        "n": n,
        "per_class": {},
        "subgroups": audit.rows,
        "synthetic": {"subgroups": audit.rows},
        "correlation": {"pearson_r": 1.0},
        "mitigation": {"sex": {"subgroups_after": audit.rows[:2]}},
    }
    plots.fairness_bars(record, tmp_path / "fair.png")
    _png_ok(tmp_path / "fair.png")

    runs = [
        {"arm": a, "seed": k, "auroc": {"value": 0.7 + 0.01 * k + (a != "real") * 0.02}}
        for k in range(3)
        for a in ("real", "real+1x")
    ]
    aug = {
        "runs": runs,
        "summary": {"real": {}, "real+1x": {}},
        "seeds": [0, 1, 2],
        "comparisons": {"real+1x": {"mean_diff": 0.02, "t_pvalue": 0.01}},
    }
    pre = {
        "n_synthetic_pretrain": 10,
        "runs": [
            {
                "arm": a,
                "fraction": f,
                "auroc": {"value": 0.6 + f / 5, "ci_low": 0.5, "ci_high": 0.9},
            }
            for a in ("real only", "synthetic pretrain")
            for f in (0.01, 0.1, 1.0)
        ],
    }
    plots.utility_plot(aug, pre, tmp_path / "utility.png")
    _png_ok(tmp_path / "utility.png")
    rows = [{"model": "m", "task": "t", "dataset": "d", "metric": "x", "value": 0.5,
             "ci_low": 0.4, "ci_high": 0.6, "n": 3}]  # fmt: skip
    plots.table_figure(rows, tmp_path / "table.png", title="summary")
    _png_ok(tmp_path / "table.png")
