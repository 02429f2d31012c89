"""The real Snakemake workflow on config/mini.yaml: outputs, conservation, rejects, reruns."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from cxrfoundry import schema
from cxrfoundry.data.shards import FAULT_ENV
from cxrfoundry.io import sha256_file
from tests.conftest import snakemake

pytestmark = pytest.mark.integration

DATASETS = ("mimic_demo", "chexpert_demo", "nih_demo", "dicom_demo")

#: The specific reason each kind of deliberately bad phantom input must be rejected with.
EXPECTED_REASONS = {
    "missing_file": ("image missing",),
    "zero_byte_image": ("image empty",),
    "truncated_image": ("image truncated", "image unreadable", "corrupt DICOM"),
    "corrupt_dicom": ("corrupt DICOM",),
    "impossible_age": ("impossible age",),
    "unknown_view": ("view unknown",),
}


def _rejects(workdir: Path, dataset: str) -> list[dict]:
    rows = pq.read_table(workdir / f"results/manifests/{dataset}.rejects.parquet").to_pylist()
    rows += pq.read_table(workdir / f"results/frontal/{dataset}.excluded.parquet").to_pylist()
    return rows


def test_manifests_follow_the_contract(mini_run):
    for dataset in DATASETS:
        manifest = pq.read_table(mini_run / f"results/manifests/{dataset}.parquet")
        assert manifest.schema.remove_metadata() == schema.MANIFEST_SCHEMA
        assert manifest.num_rows > 0
        ids = manifest.column("image_id").to_pylist()
        assert len(set(ids)) == len(ids)
        assert all(i.startswith(f"{dataset}/") for i in ids)
        reports = pq.read_table(mini_run / f"results/reports/{dataset}.parquet")
        assert reports.schema.remove_metadata() == schema.REPORTS_SCHEMA
        assert all(reports.column("report").to_pylist())


def test_counts_add_up_in_audits_and_mlflow(mini_run):
    audit = json.loads((mini_run / "results/audit/data.json").read_text())
    assert audit["ok"]
    for dataset in DATASETS:
        ingest = audit["datasets"][dataset]["ingest"]
        assert ingest["rows_in"] == ingest["rows_kept"] + ingest["rows_rejected"]
        assert ingest["rows_rejected"] > 0  # the phantom always plants bad inputs
    db = mini_run / "results/mlflow.db"
    with sqlite3.connect(db) as con:
        logged = dict(
            con.execute(
                "SELECT r.name, m.value FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                "WHERE m.key = 'rows_rejected' AND r.status = 'FINISHED'"
            ).fetchall()
        )
    for dataset in DATASETS:
        assert logged[f"ingest:{dataset}"] == audit["datasets"][dataset]["ingest"]["rows_rejected"]


def _planted_by_image(planted: list[dict]) -> dict[str, set[str]]:
    """Bad-input kinds per affected image, keyed by the image's native id.

    A patient-level fault (MIMIC's impossible age) lists every image it affects; their file
    stems are MIMIC dicom ids, which are unique.
    """
    kinds: dict[str, set[str]] = {}
    for bad in planted:
        keys = (
            [Path(p).stem for p in bad["image_paths"]]
            if bad.get("image_paths")
            else [bad["row_id"]]
        )
        for key in keys:
            kinds.setdefault(key, set()).add(bad["kind"])
    return kinds


def test_every_planted_bad_input_is_rejected_with_its_reason(mini_run):
    for dataset in DATASETS:
        planted = json.loads(
            (mini_run / f"resources/raw/{dataset}/phantom_bad_inputs.json").read_text()
        )["bad_inputs"]
        assert planted, dataset
        rejects = _rejects(mini_run, dataset)
        frontal = pq.read_table(mini_run / f"results/frontal/{dataset}.parquet").to_pylist()
        for key, kinds in _planted_by_image(planted).items():
            allowed = tuple(r for kind in kinds for r in EXPECTED_REASONS[kind])
            hits = [
                r for r in rejects if key in (r["image_id"] or "") + r["source_file"] + r["row"]
            ]
            if not hits and kinds == {"unknown_view"}:
                # An unknown view code that the image classifier resolved is not lost either.
                decided = [r for r in frontal if key in r["image_id"]]
                assert decided and decided[0]["view_source"] == "classifier", (dataset, key)
                continue
            assert hits, f"{dataset}: planted {kinds} for {key} is in no rejects table"
            assert any(h["reason"].startswith(allowed) for h in hits), (
                dataset,
                key,
                kinds,
                [h["reason"] for h in hits],
            )


def test_shards_are_readable_without_project_code(mini_run):
    shard_dir = mini_run / "results/shards/demo"
    index = json.loads((shard_dir / "index.json").read_text())
    files = sorted(shard_dir.glob("*-*.parquet"))
    assert files and len(files) == len(index["shards"])
    frame = pl.read_parquet(files)
    assert frame.height == index["counts"]["rows_written"]
    assert set(frame["split"].unique()) <= {"train", "val", "test"}
    for shard in index["shards"]:
        assert sha256_file(shard_dir / shard["file"]) == shard["sha256"]


def test_every_job_has_a_provenance_record_matching_its_outputs(mini_run):
    records = sorted((mini_run / "results/provenance").glob("*/*.json"))
    rules = {p.parent.name for p in records}
    assert {"download", "ingest", "filter_frontal", "synthesize_reports", "shard"} <= rules
    assert "data_audit" in rules
    for path in records:
        record = json.loads(path.read_text())
        assert record["code_sha256"] and record["mlflow_run_id"]
        for output, digest in record["outputs"].items():
            target = mini_run / output
            if target.is_file():
                assert sha256_file(target) == digest, output


def test_second_run_is_a_no_op(mini_run):
    proc = snakemake(mini_run, "--dry-run")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_killed_shard_job_reruns_to_identical_bytes(mini_run, tmp_path):
    """Kill the shard job part-way, rerun: the shards equal an uninterrupted run's."""
    workdir = tmp_path / "killed"
    workdir.mkdir()
    # Reuse the upstream outputs (same bytes), then rebuild only the shards.
    for sub in ("resources", "results"):
        shutil.copytree(mini_run / sub, workdir / sub, symlinks=True)
    shutil.rmtree(workdir / "results/shards")
    shutil.rmtree(workdir / "results/.work", ignore_errors=True)
    proc = snakemake(
        workdir,
        "results/shards/demo",
        "--forcerun",
        "shard",
        check=False,
        env={FAULT_ENV: "3"},
    )
    assert proc.returncode != 0, "the fault hook should have killed the shard job"
    assert not (workdir / "results/shards/demo/index.json").exists()
    assert any((workdir / "results/.work/shards/demo").rglob("*.parquet"))
    snakemake(workdir, "results/shards/demo", "--rerun-incomplete")
    reference = mini_run / "results/shards/demo"
    for path in [*sorted(reference.glob("*.parquet")), reference / "index.json"]:
        rerun = workdir / "results/shards/demo" / path.name
        assert sha256_file(rerun) == sha256_file(path), path.name


def test_real_nih1000_ingests_cleanly(shared_real, tmp_path):
    """The 1,000 real NIH images + their real Data_Entry rows, through the documented config."""
    workdir = tmp_path / "nih"
    workdir.mkdir()
    # The config names ../shared/data/real/nih1000, as seen from a checkout's root.
    (tmp_path / "shared").symlink_to(shared_real.parent.parent)
    snakemake(workdir, "data", config="config/nih1000.yaml")
    manifest = pq.read_table(workdir / "results/manifests/nih1000.parquet").to_pylist()
    assert len(manifest) == 1000
    views = {v: sum(r["view"] == v for r in manifest) for v in ("PA", "AP")}
    assert views == {"PA": 637, "AP": 363}
    assert sum(r["cardiomegaly"] == 1 for r in manifest) > 0
    audit = json.loads((workdir / "results/audit/data.json").read_text())
    assert audit["corpora"]["nih1000"]["rows_written"] == 1000
    assert os.path.exists(workdir / "results/shards/nih1000/index.json")
