"""Benchmark table collection and report figures (cxrfoundry.eval.table, eval.plots)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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


def test_curation_sample_grid_and_ablation_figures(tmp_path) -> None:
    from tests.unit.eval_shards import make_shards

    rng = np.random.default_rng(2)
    n = 60
    categories = ["central_kept", "support", "central_dropped", "outlier"]
    subset = pa.table(
        {
            "image_id": [f"{'ab'[i % 2]}_demo/{i}" for i in range(n)],
            "index": np.arange(n),
            "category": [categories[i % 4] for i in range(n)],
            "cluster": (np.arange(n) % 3).astype(np.int16),
            "distance": rng.random(n).astype(np.float32),
            "weight": np.ones(n, np.float32),
            "kept": np.array([i % 4 < 2 for i in range(n)]),
        }
    )
    model = tmp_path / "clip"
    cio.write_parquet(model / "subset.parquet", subset)
    cio.write_json(model / "metrics.json", {"samples_seen": 1234})
    plots.curation_plot(model, tmp_path / "curation.png")
    _png_ok(tmp_path / "curation.png")
    with pytest.raises(FileNotFoundError, match="no curated subset"):
        plots.curation_plot(tmp_path, tmp_path / "x.png")

    real = make_shards(tmp_path / "real", {"test": 6}, size=32)
    # A "cohort" whose rows name real test images as their sources: the grid pairs them.
    table = pa.concat_tables([pq.read_table(p) for p in sorted(real.glob("test-*.parquet"))])
    sources = table.column("image_id").to_pylist()
    cohort = table.append_column("source_image_id", pa.array(sources[::-1]))
    cio.write_parquet(tmp_path / "cohort" / "test-00000.parquet", cohort)
    plots.sample_grid(real, tmp_path / "cohort", tmp_path / "grid.png", n=4)
    _png_ok(tmp_path / "grid.png")
    from PIL import Image

    width, height = Image.open(tmp_path / "grid.png").size
    assert height > 300 and width >= 4 * 150  # two rows of four

    record = {"model": "dino", "dataset": "demo", "metric": "auroc_macro", "n": 10}
    records = [
        {**record, "task": "probe_linear", "value": 0.7, "ci_low": 0.6, "ci_high": 0.8},
        {**record, "task": "probe_finetune", "value": 0.75, "ci_low": 0.65, "ci_high": 0.85},
        {**record, "task": "seg_unet", "value": 0.8, "ci_low": None, "ci_high": None},
    ]
    dino = [{"model": "dino", "num_register_tokens": 4, "centering": "ema", "auroc_mean": 0.7,
             "auroc_ci": [0.6, 0.8], "auroc_gain": 0.02, "dice_lungs": 0.9},
            {"model": "dino_random", "num_register_tokens": None, "centering": None,
             "auroc_mean": 0.68, "auroc_ci": [0.6, 0.78], "auroc_gain": None,
             "dice_lungs": None}]  # fmt: skip
    tables = plots.ablation_rows(records, dino)
    (cls_title,) = [t for t in tables if t.startswith("Classification")]
    header, body = tables[cls_title]
    assert header == ["model", "dataset", "probe_linear", "probe_finetune"]
    assert body == [["dino", "demo", "0.700 [0.600, 0.800]", "0.750 [0.650, 0.850]"]]
    dino_rows = tables["DINO ablation (rule dino_ablation)"][1]
    assert dino_rows[1][:3] == ["dino_random", "–", "–"]
    plots.ablation_figure(records, tmp_path / "ablation.png", dino_ablation=dino)
    _png_ok(tmp_path / "ablation.png")


def test_paired_gains_over_the_random_baseline(tmp_path) -> None:
    rng = np.random.default_rng(4)
    n = 150
    y = rng.random((n, 2)) < 0.4
    shared = rng.normal(0, 1, y.shape)  # per-image difficulty both models see
    paths = []
    for model, signal in (("dino", 1.6), ("dino_random", 1.2)):
        cols = {"image_id": [f"i{i}" for i in range(n)],
                "patient_id": [f"p{i // 2}" for i in range(n)]}  # fmt: skip
        for j, c in enumerate(["cardiomegaly", "edema"]):
            cols[f"label.{c}"] = y[:, j].astype(np.int8)
            cols[f"valid.{c}"] = np.ones(n, bool)
            cols[f"score.{c}"] = signal * y[:, j] + shared[:, j]
        path = tmp_path / model / "predictions" / "probe_linear.demo.parquet"
        cio.write_parquet(path, pa.table(cols))
        paths.append(path)
    (gain,) = table.paired_gains(paths, n_boot=300, seed=1)
    assert (gain["model"], gain["baseline"], gain["task"], gain["dataset"]) == (
        "dino", "dino_random", "probe_linear", "demo")  # fmt: skip
    assert 0 < gain["ci_low"] <= gain["value"] <= gain["ci_high"]
    text = table.render_markdown([], [gain])
    assert text.startswith("# Benchmark summary")
    rows = [{"model": "dino", "task": "probe_linear", "dataset": "demo", "metric": "auroc",
             "value": 0.8, "ci_low": 0.7, "ci_high": 0.9, "n": n, "pretrain_flops": None,
             "samples_seen": None}]  # fmt: skip
    assert "## Gain over the random-init baseline" in table.render_markdown(rows, [gain])
    other = tmp_path / "clip" / "predictions" / "probe_linear.demo.parquet"
    cio.write_parquet(other, pa.table({**{k: v for k, v in pa.table(cols).to_pydict().items()},
                                       "image_id": [f"x{i}" for i in range(n)]}))  # fmt: skip
    with pytest.raises(ValueError, match="different test images"):
        table.paired_gains([*paths, other], n_boot=10)
