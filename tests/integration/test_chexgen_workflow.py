"""ChexGen in the real mini workflow: models, synthetic cohorts and generation-quality metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cxrfoundry.data.dataset import list_shards
from cxrfoundry.eval.metrics import read_metrics
from cxrfoundry.eval.probe import load_cohort
from cxrfoundry.generate.cohorts import COHORT_SCHEMA
from cxrfoundry.schema import FINDING_COLUMNS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MINI = yaml.safe_load((REPO / "config/mini.yaml").read_text())
COHORTS = MINI["chexgen"]["cohorts"]


def _real(run: Path, split: str) -> dict[str, dict]:
    files = list_shards(run / "results/shards/demo", split)
    return {r["image_id"]: r for f in files for r in pq.read_table(f).to_pylist()}


def test_chexgen_models_exist(mini_run):
    models = mini_run / "results/models"
    for name in ("chexgen_vae", "chexgen_stage1", "chexgen", "chexgen_controlnet"):
        assert (models / name / "metrics.json").is_file(), name
    assert (models / "chexgen" / "model_index.json").is_file()  # a diffusers pipeline
    for judge in ("cxr_classifier", "cxr_segmenter"):
        assert (models / judge / "judge.json").is_file()


@pytest.mark.parametrize("name", COHORTS)
def test_cohort_follows_the_contract(mini_run, name):
    folder = mini_run / "results/cohorts" / name
    index = json.loads((folder / "index.json").read_text())
    spec = yaml.safe_load((REPO / "config/cohorts" / f"{name}.yaml").read_text())
    files = list_shards(folder, None, verify=True)
    assert files and all(f.name.startswith(f"{spec.get('split', 'test')}-") for f in files)
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.schema.remove_metadata() == COHORT_SCHEMA
    rows = table.to_pylist()
    assert len(rows) == index["counts"]["rows_written"] > 0
    assert len({r["image_id"] for r in rows}) == len(rows)
    assert all(r["synthetic"] and r["image_id"].startswith(f"synthetic/{name}/") for r in rows)
    assert all(r["patient_id"].startswith("syn:") for r in rows)
    assert all(r["guidance"] == MINI["chexgen"]["sampling"]["guidance_scale"] for r in rows)
    kind = spec["kind"]
    if kind in ("matched", "balance"):
        real = _real(mini_run, spec["split"])
        for r in rows:
            src = real[r["source_image_id"]]
            assert r["patient_id"] == "syn:" + src["patient_id"]
            for key in ("sex", "age", "race", "view", *FINDING_COLUMNS):
                assert r[key] == src[key], (name, key)
            assert (r["mask"] is not None) == bool(spec.get("controlnet"))
    if kind == "matched":
        per_case = spec.get("multiplicity", 1)
        assert len(rows) == per_case * len(_real(mini_run, spec["split"]))
    if kind == "balance":
        real = _real(mini_run, spec["split"])
        counts = {s: sum(r["sex"] == s for r in real.values()) for s in ("F", "M")}
        for s in counts:
            added = sum(r["sex"] == s for r in rows)
            assert counts[s] + added == max(counts.values())
    if kind == "stratified":
        assert all(r["source_image_id"] is None for r in rows)
    cohort = load_cohort(folder, None, {"image_size": None, "equalize": False}, source="synthetic")
    assert len(cohort) == len(rows)


def test_generation_quality_follows_the_metrics_contract(mini_run):
    record = read_metrics(mini_run / "results/benchmarks/chexgen/generation_quality.json")
    assert record["task"] == "generation_quality" and record["model"] == "chexgen"
    assert record["metric"] == "fid_classifier"
    assert record["value"] == record["fid"]["classifier"]["trained"]
    for space in ("classifier", "clip"):
        assert set(record["fid"][space]) == {"trained", "untrained", "noise", "real_val"}
        assert all(v >= -1e-6 for v in record["fid"][space].values())
    assert record["n"] == record["fid_n"]["trained"] > 0
    assert -1 <= record["factual_correctness"]["pooled"]["value"] <= 1
    assert 0 < record["diversity"]["ms_ssim_synthetic"]["value"] <= 1
    assert record["controlnet"]["n"] > 0
    assert 0 <= record["controlnet"]["dice_mean"]["value"] <= 1
    assert 0 <= record["controlnet"]["dice_mismatched_masks"]["value"] <= 1
    gain = record["controlnet"]["mask_specific_gain"]
    assert gain["ci_low"] <= gain["value"] <= gain["ci_high"]
    assert set(record["per_class"]) >= {"Cardiomegaly", "Pleural Effusion"}
    grid = mini_run / "results/plots/chexgen/real_vs_synthetic.png"
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_and_metrics_are_logged_to_mlflow(mini_run):
    import sqlite3

    with sqlite3.connect(mini_run / "results/mlflow.db") as con:
        runs = con.execute(
            "SELECT run_uuid, status FROM runs WHERE name LIKE 'generation_quality:%'"
        ).fetchall()
        assert runs and runs[-1][1] == "FINISHED"
        keys = {
            k for (k,) in con.execute("SELECT key FROM metrics WHERE run_uuid = ?", (runs[-1][0],))
        }
    assert {"fid.classifier.trained", "fid.clip.untrained", "factual_correctness.value"} <= keys
    logged = list((mini_run / "results/mlartifacts").rglob("real_vs_synthetic.png"))
    assert logged, "the real-vs-synthetic grid is not among the MLflow artifacts"
