"""The reproducibility audit on a real run of the mini workflow, and on tampered copies of it.

A fresh run passes (the workflow's own ``audit`` rule and ``cxrfoundry audit``); a flipped byte
in an output, a changed param and a swapped input file are each caught, naming the culprit;
``cxrfoundry reproduce`` rebuilds a manifest bit for bit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxrfoundry.audit import WORKFLOW_FILES, audit
from cxrfoundry.io import read_json
from tests.conftest import REPO, snakemake

pytestmark = pytest.mark.integration

MINI = REPO / "config" / "mini.yaml"


@pytest.fixture
def run_copy(mini_run, tmp_path) -> Path:
    """A private copy of the finished run to tamper with."""
    return Path(shutil.copytree(mini_run, tmp_path / "run", symlinks=True))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``cxrfoundry ARGS`` as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "cxrfoundry.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )


def cli_audit(workdir: Path) -> tuple[int, str, dict]:
    """Run ``cxrfoundry audit`` in ``workdir``; return exit code, output, the JSON report."""
    # The report goes beside, not over, the audit rule's own recorded outputs.
    proc = cli("audit", "--configfile", str(MINI), "--out", "results/audit/cli", cwd=workdir)
    report = read_json(workdir / "results/audit/cli/audit.json")
    return proc.returncode, proc.stdout + proc.stderr, report


def errors(report: dict) -> list[tuple[str, str | None, str | None]]:
    return [
        (f["kind"], f["path"], f["record"]) for f in report["findings"] if f["severity"] == "error"
    ]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def mini_jobs(workdir: Path) -> int:
    """How many jobs the whole mini workflow has (a dry run with ``--forceall``)."""
    proc = snakemake(workdir, "--dry-run", "--forceall", "--quiet", "rules")
    counts = [line.split() for line in proc.stdout.splitlines()]
    total = [int(row[1]) for row in counts if len(row) == 2 and row[0] == "total"]
    assert total, proc.stdout
    return total[0]


def test_fresh_run_passes_the_audit_rule_and_the_cli(run_copy):
    rule_report = read_json(run_copy / "results/audit/audit.json")
    assert rule_report["ok"] and rule_report["counts"]["errors"] == 0, rule_report["findings"]
    # Every job of the mini workflow but the audit itself and `all` (which writes nothing).
    jobs = mini_jobs(run_copy)
    assert rule_report["counts"]["records"] == jobs - 2
    assert jobs - 2 >= 18, "4 datasets x 4 rules, shard, data_audit and the model stages"
    assert rule_report["counts"]["raw_files_checked"] > 0
    # The run-time table: every job in it once, rules grouped by stage (rules file), data first.
    stages = {row["stage"]: row for row in rule_report["run_time"]}
    assert stages["all"]["jobs"] == jobs - 2
    assert sum(row["jobs"] for row in rule_report["run_time"] if row["stage"] != "all") == jobs - 2
    assert rule_report["run_time"][0]["stage"] == "data"
    assert {"download", "shard", "probe"}.isdisjoint(stages)  # grouped, not per rule
    assert "## Run time" in (run_copy / "results/audit/audit.md").read_text()
    rc, out, report = cli_audit(run_copy)
    assert rc == 0, out
    assert "audit PASS" in out
    # The audit rule's record is in the chain now, and nothing is stale.
    assert report["counts"]["records"] == jobs - 1
    assert report["counts"]["errors"] == report["counts"]["stale"] == 0, report["findings"]
    assert (run_copy / "results/audit/cli/audit.md").read_text().count("PASS") == 1
    # The CLI groups by stage too, with the map the audit rule recorded (its own job included).
    cli_stages = {row["stage"]: row for row in report["run_time"]}
    assert cli_stages["data"]["jobs"] == stages["data"]["jobs"]
    assert {"download", "shard", "probe"}.isdisjoint(cli_stages)


@pytest.mark.parametrize(
    ("victim", "culprit", "kind", "record"),
    [
        (
            "results/shards/demo/train-00003.parquet",
            "results/shards/demo",
            "output_modified",
            "results/provenance/shard/demo.json",
        ),
        (
            "results/manifests/nih_demo.parquet",
            "results/manifests/nih_demo.parquet",
            "output_modified",
            "results/provenance/ingest/nih_demo.json",
        ),
        ("RAW", "RAW", "raw_modified", None),
    ],
    ids=["shard", "manifest", "raw-image"],
)
def test_flipped_byte_fails_naming_the_file(run_copy, victim, culprit, kind, record):
    if victim == "RAW":
        victim = culprit = min(
            p.relative_to(run_copy).as_posix()
            for p in (run_copy / "resources/raw/chexpert_demo").rglob("*.jpg")
            if p.stat().st_size > 1000  # the phantom plants empty and truncated images
        )
    flip_byte(run_copy / victim)
    rc, out, report = cli_audit(run_copy)
    assert rc == 1, out
    assert "audit FAIL" in out and culprit in out
    assert errors(report) == [(kind, culprit, record)], report["findings"]


def test_swapped_input_file_fails_naming_it(run_copy):
    """nih_demo's frontal table replaced by chexpert_demo's (a valid file, wrong content)."""
    swapped = "results/frontal/nih_demo.parquet"
    shutil.copy2(run_copy / "results/frontal/chexpert_demo.parquet", run_copy / swapped)
    rc, out, report = cli_audit(run_copy)
    assert rc == 1, out
    assert errors(report) == [
        ("output_modified", swapped, "results/provenance/filter_frontal/nih_demo.json")
    ], report["findings"]
    assert swapped in (run_copy / "results/audit/cli/audit.md").read_text()


def _config_with(tmp_path: Path, edit) -> Path:
    config = yaml.safe_load(MINI.read_text())
    edit(config)
    path = tmp_path / "edited.yaml"
    # Key order kept: Snakemake's params comparison is order-sensitive.
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_changed_param_is_flagged_naming_the_param(run_copy, tmp_path):
    snakefile = REPO / "Snakefile"
    # The run's folder has no Snakefile (the tests run the checkout's): without one, the audit
    # cannot know the current params and says so instead of passing them silently.
    report = audit(run_copy, configfiles=[MINI], check_raw=False)
    assert report.ok and not report.stale
    assert [f.kind for f in report.findings] == ["params_not_compared"]

    # Control: the same config, planned by the checkout's Snakefile: nothing stale.
    report = audit(run_copy, snakefile=snakefile, configfiles=[MINI], check_raw=False)
    assert report.ok and not report.findings, report.findings

    edited = _config_with(tmp_path, lambda c: c["shards"].update(row_group_size=8))
    report = audit(run_copy, snakefile=snakefile, configfiles=[edited], check_raw=False)
    # The shard job and the synthetic cohorts (written with the same shard settings) are stale.
    by_record = {f.record: f for f in report.stale}
    assert {r for r in by_record if "/synthesize_cohort/" not in r} == {
        "results/provenance/shard/demo.json"
    }
    for record, stale in by_record.items():
        assert stale.kind == "stale_params"
        assert stale.details["params"][0].endswith("settings.row_group_size"), record
    finding = by_record["results/provenance/shard/demo.json"]
    assert finding.details["params"] == ["settings.row_group_size"]
    assert finding.details["recorded"] == {"settings.row_group_size": 16}
    assert finding.details["current"] == {"settings.row_group_size": 8}
    assert "settings.row_group_size" in finding.message
    assert report.ok, "stale is reported, not failed, by default"
    assert not report.errors
    strict = audit(run_copy, current_params=None, snakefile=snakefile, configfiles=[edited],
                   check_raw=False, strict=True)  # fmt: skip
    assert not strict.ok and "settings.row_group_size" in strict.to_markdown()


def test_reproduce_rebuilds_a_manifest_bitwise(run_copy):
    # `cxrfoundry reproduce` runs from a checkout: give the run's folder the workflow files.
    for name in WORKFLOW_FILES:
        if (REPO / name).exists():
            (run_copy / name).symlink_to(REPO / name)
    target = "results/manifests/nih_demo.parquet"
    proc = cli("reproduce", target, "--configfile", "config/mini.yaml", cwd=run_copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reproduce OK" in proc.stdout
    (result,) = read_json(run_copy / "results/audit/reproduce/audit.json")["reproductions"]
    assert result["ok"] and result["rule"] == "ingest"
    assert {c["path"]: c["result"] for c in result["comparisons"]} == {
        target: "identical",
        "results/manifests/nih_demo.rejects.parquet": "identical",
        "results/manifests/nih_demo.audit.json": "identical",
    }
    # Only the target's own job ran: the scratch folder is gone, the run is untouched.
    assert not Path(result["scratch"]).exists()
    assert audit(run_copy, check_raw=False, stale=False).ok


def test_reproduce_retrains_a_model_within_tolerance(run_copy):
    """A training job reproduces: weights and metrics equal within the stated tolerance, the
    throughput and wall-time fields of metrics.json aside."""
    for name in WORKFLOW_FILES:
        if (REPO / name).exists():
            (run_copy / name).symlink_to(REPO / name)
    target = "results/models/dino"
    proc = cli("reproduce", target, "--configfile", "config/mini.yaml", cwd=run_copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = read_json(run_copy / "results/audit/reproduce/audit.json")["reproductions"]
    assert result["ok"] and result["rule"] == "pretrain_dino", result
    (comparison,) = result["comparisons"]
    assert comparison["result"] in ("identical", "within tolerance"), comparison
