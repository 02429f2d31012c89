"""The benchmarks stage in the real workflow (config/mini.yaml): metrics JSONs, the summary table,
MLflow runs under the producing model's run, and the synthetic-data paths on the cohorts the mini
run's ChexGen stage generated.

The mini run audits fairness with the synthetic test cohort and balancing pool; the utility
experiments (augmentation, synthetic pretraining) are off there to keep it short and run here on a
copy of the run with `benchmarks.cohorts.augment` and `benchmarks.utility.models` switched on.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cxrfoundry import io as cio
from cxrfoundry.eval import metrics as M
from cxrfoundry.eval import table as T
from tests.conftest import REPO, copy_run, snakemake
from tests.integration.test_report_html import check_report

pytestmark = pytest.mark.integration

MODELS = ("dino", "dino_random")
STAGE_TASKS = ("probe_linear", "seg_unet")


def _stage_files(run: Path) -> dict[str, Path]:
    files = {
        f"{m}/{t}": run / f"results/benchmarks/{m}/{t}.demo.json"
        for m in MODELS
        for t in STAGE_TASKS
    }
    files["dino/fairness"] = run / "results/benchmarks/dino/fairness.demo.json"
    return files


def test_metrics_jsons_follow_the_contract(mini_run):
    for name, path in _stage_files(mini_run).items():
        record = M.read_metrics(path)  # validates the DESIGN.md section 3 keys
        model, task = name.split("/")
        assert record["model"] == model and record["task"] == task, path
        assert record["dataset"] == "demo"
        if record["value"] is not None and record["ci_low"] is not None:
            assert record["ci_low"] <= record["value"] <= record["ci_high"], path
        if task.startswith("probe"):
            assert record["n_boot"] >= 500 and "patients" in record["ci_method"]
            assert record["n_patients"] <= record["n"]
            assert record["compute"]["eval_flops_per_image"] > 0
            for finding in record["per_class"].values():
                assert set(finding) == {"auroc", "auroc_ci", "auprc", "auprc_ci", "n_pos"}
        if task.startswith("seg"):
            assert set(record["per_class"]) == {"lungs", "heart"}
            assert 0 < record["value"] <= 1
    fairness = M.read_metrics(mini_run / "results/benchmarks/dino/fairness.demo.json")
    attributes = {row["attribute"] for row in fairness["subgroups"]}
    assert {"sex", "age", "race"} <= attributes and "sex&age" in attributes
    # The mini ChexGen cohorts: matched to the test split, and a sex-balancing pool.
    assert fairness["synthetic"]["n"] > 0 and fairness["correlation"]["n_groups"] >= 3
    assert {p["attribute"] for p in fairness["correlation"]["pairs"]} >= {"sex", "age"}
    sex = fairness["mitigation"]["sex"]
    added = sum(v["taken"] for v in sex["added"].values())
    assert sex["n_train_after"] == fairness["details"]["n_train"] + added
    assert {"gap_before", "gap_after", "worst_before", "worst_after", "gap_change_ci"} <= set(sex)
    # The DINO stage's records come from the same library, in its own format.
    cls = cio.read_json(mini_run / "results/benchmarks/dino/cls.json")
    assert cls["task"] == "cls" and cls["ci_method"] == "percentile bootstrap over patients"
    assert len(cls["details"]["bootstrap_replicates"]) == 20  # mini: dino.finetune.cls.bootstrap


def test_summary_collects_every_metrics_json(mini_run):
    root = mini_run / "results/benchmarks"
    with (root / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and list(rows[0]) == list(T.COLUMNS)
    found = {(r["model"], r["task"]) for r in rows}
    expected = {(m, t) for m in MODELS for t in (*STAGE_TASKS, "cls", "seg")}
    expected |= {("dino", "fairness"), ("clip", "zeroshot"), ("clip", "retrieval")}
    assert expected <= found, expected - found
    for row in rows:
        record = M.read_metrics(mini_run / row["file"])
        assert float(row["value"]) == pytest.approx(record["value"])
        if row["model"] == "dino":
            assert float(row["pretrain_flops"]) > 0 and int(row["samples_seen"]) > 0
    md = (root / "summary.md").read_text()
    assert "## demo: model × task" in md and "## Pretraining compute" in md
    for model in (*MODELS, "clip"):
        assert f"| {model} |" in md
    for png in ("summary.png", "ablation.png", "samples.demo.png", "clip/curation.png",
                "dino/roc_linear.demo.png", "dino/fairness.demo.png"):  # fmt: skip
        data = (mini_run / "results/plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png


def test_evaluation_runs_are_children_of_the_model_run(mini_run):
    with sqlite3.connect(mini_run / "results/mlflow.db") as con:
        runs = {
            name: (run_id, exp)
            for run_id, name, exp in con.execute(
                "SELECT run_uuid, name, experiment_id FROM runs WHERE status = 'FINISHED'"
            )
        }
        tags = {}
        for run_id, key, value in con.execute("SELECT run_uuid, key, value FROM tags"):
            tags.setdefault(run_id, {})[key] = value
    parent_id, parent_exp = runs["pretrain_dino:dino"]
    for job in ("probe:dino__linear__demo", "segment:dino__unet__demo", "fairness:dino__demo",
                "finetune_cls:dino"):  # fmt: skip
        run_id, exp = runs[job]
        assert exp == parent_exp, job
        assert tags[run_id].get("mlflow.parentRunId") == parent_id, job
    clip_id, _ = runs["pretrain_clip:all"]
    assert tags[runs["zeroshot:all"][0]].get("mlflow.parentRunId") == clip_id
    baseline, _ = runs["probe:dino_random__linear__demo"]
    assert "mlflow.parentRunId" not in tags[baseline]  # random init: nothing produced it


@pytest.fixture(scope="module")
def synthetic_run(mini_run, tmp_path_factory):
    """A copy of the mini run with the utility experiments and the DINO ablation switched on."""
    work = copy_run(mini_run, tmp_path_factory.mktemp("bench-synthetic") / "run")
    config = yaml.safe_load((REPO / "config/mini.yaml").read_text())
    config["benchmarks"]["cohorts"]["augment"] = "matched_train"
    config["benchmarks"]["utility"]["models"] = ["dino"]
    config["benchmarks"]["report"] = {"dino_ablation": True}
    path = work.parent / "synthetic.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = snakemake(work, "--dry-run", config=str(path))
    planned = proc.stdout + proc.stderr
    for rule in ("augment", "synth_pretrain", "utility_plot", "dino_ablation", "ablation_plot",
                 "benchmark_table"):  # fmt: skip
        assert f"rule {rule}:" in planned, rule
    for rule in ("pretrain_dino", "synthesize_cohort", "fairness", "probe"):
        assert f"rule {rule}:" not in planned, rule  # nothing else reruns
    snakemake(work, config=str(path))
    return work


def test_utility_experiments_on_the_chexgen_cohort(synthetic_run):
    bench = synthetic_run / "results/benchmarks/dino"
    augment = M.read_metrics(bench / "augment.demo.json")
    arms = {(r["arm"], r["seed"]) for r in augment["runs"]}
    assert arms == {(a, s) for a in ("real", "real+1x") for s in (1234, 1235)}
    assert augment["comparisons"]["real+1x"]["n_seeds"] == 2
    assert augment["synthetic_cohort"] == "results/cohorts/matched_train"
    for run in augment["runs"]:
        if run["arm"] == "real+1x":  # the cohort holds two images per real case
            assert run["n_synthetic"] == run["n_real"]
    pretrain = M.read_metrics(bench / "synth_pretrain.demo.json")
    assert set(pretrain["differences"]) == {"0.5", "1"}
    assert {r["arm"] for r in pretrain["runs"]} == {"real only", "synthetic pretrain"}
    assert pretrain["n_synthetic_pretrain"] > 0
    summary = (synthetic_run / "results/benchmarks/summary.md").read_text()
    assert "| augment |" in summary and "| synth_pretrain |" in summary
    assert (synthetic_run / "results/plots/dino/utility.demo.png").stat().st_size > 5000
    # The sample grid pairs synthetic images with their real sources: two rows of images.
    assert Image.open(synthetic_run / "results/plots/samples.demo.png").size[1] > 300
    assert "NaN" not in json.dumps(augment)


def test_report_shows_the_synthetic_data_figures(synthetic_run, tmp_path):
    figures = (
        ("Synthetic data utility", None, "augmentation and pretraining", "dino/utility.demo.png"),
        ("Data", "demo", "real vs synthetic samples", "samples.demo.png"),
        ("Summary", None, "ablations", "ablation.png"),
    )
    work = copy_run(synthetic_run, tmp_path / "run")
    check_report(work, figures, tmp_path, config=str(synthetic_run.parent / "synthetic.yaml"))
    ablation = (synthetic_run / "results/benchmarks/dino_ablation.md").read_text()
    assert "| dino_random |" in ablation
