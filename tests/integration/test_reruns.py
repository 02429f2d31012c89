"""Partial reruns of the real workflow (config/mini.yaml): what a change makes Snakemake redo.

One completed mini run is made once per session and copied (``shutil.copytree``, mtimes and
Snakemake's metadata included) for every scenario, so no scenario disturbs another. What would
rerun is read from Snakemake's own ``--dry-run`` job list; one scenario reruns for real.
(``--list-changes params`` is no use here: Snakemake 9 lists nearly every output even when
nothing changed.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import cxrfoundry
from cxrfoundry.io import read_json, sha256_file
from cxrfoundry.provenance import code_hash, module_closure
from tests.conftest import REPO, copy_run, snakemake

pytestmark = pytest.mark.integration

DATASETS = ("chexpert_demo", "dicom_demo", "mimic_demo", "nih_demo")
PER_DATASET = ("download", "ingest", "filter_frontal", "synthesize_reports")


def write_config(path: Path, edit) -> Path:
    """config/mini.yaml with ``edit(config)`` applied, written to ``path``.

    Key order is kept: Snakemake compares params by their representation, so a config whose
    mappings were merely reordered would already make every job's params differ.
    """
    config = yaml.safe_load((REPO / "config" / "mini.yaml").read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


_JOB = re.compile(r"^(?:local)?rule (\w+):$")


def planned_jobs(workdir: Path, *args: str, **kwargs) -> list[dict[str, str]]:
    """The jobs ``snakemake --dry-run`` would run: rule, wildcards (``k=v, ...``), reason."""
    proc = snakemake(workdir, "--dry-run", *args, **kwargs)
    jobs: list[dict[str, str]] = []
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        match = _JOB.match(line)
        if match:
            jobs.append({"rule": match.group(1), "wildcards": "", "reason": ""})
        elif jobs and line.startswith("    ") and ": " in line:
            key, value = line.strip().split(": ", 1)
            if key in ("wildcards", "reason"):
                jobs[-1][key] = value
        elif line.startswith("Reasons:"):  # the summary after the job list
            break
    if not jobs:
        assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    return jobs


def by_rule(jobs: list[dict[str, str]]) -> Counter:
    return Counter(j["rule"] for j in jobs)


def datasets_of(jobs: list[dict[str, str]], rule: str) -> set[str]:
    return {j["wildcards"].removeprefix("dataset=") for j in jobs if j["rule"] == rule}


@pytest.fixture(scope="module")
def downstream_of_corpus(mini_run, tmp_path_factory) -> Counter:
    """Every job of the mini workflow that reads the corpus' shards, directly or not.

    Taken from the full job list (``--forceall``) so that it follows the stages the workflow
    has: everything but the per-dataset jobs upstream of the shards.
    """
    workdir = copy_run(mini_run, tmp_path_factory.mktemp("forceall") / "run")
    every = by_rule(planned_jobs(workdir, "--forceall"))
    return Counter({rule: n for rule, n in every.items() if rule not in PER_DATASET})


def test_shard_setting_reruns_shards_and_what_reads_them(mini_run, tmp_path, downstream_of_corpus):
    """`shards.image_size` reruns the shard job and what reads it; a real rerun does just that."""
    workdir = copy_run(mini_run, tmp_path / "run")
    assert planned_jobs(workdir) == [], "a copied, finished run must plan nothing"
    config = write_config(tmp_path / "size.yaml", lambda c: c["shards"].update(image_size=48))
    jobs = planned_jobs(workdir, config=str(config))
    assert by_rule(jobs) == downstream_of_corpus, jobs
    assert {"shard", "data_audit", "audit", "all"} <= set(downstream_of_corpus)
    (shard,) = [j for j in jobs if j["rule"] == "shard"]
    assert shard["reason"].startswith("Params have changed"), shard

    # The real rerun, of the `data` target (the model stages downstream would take minutes):
    # only the shards and the data audit change; everything upstream stays, byte for byte.
    upstream = [
        p
        for sub in ("resources/raw", "results/manifests", "results/frontal", "results/reports")
        for p in sorted((workdir / sub).rglob("*"))
        if p.is_file()
    ]
    before = {p: (sha256_file(p), p.stat().st_mtime_ns) for p in upstream}
    records = {p: sha256_file(p) for p in (workdir / "results/provenance").rglob("*.json")}
    old_index = read_json(workdir / "results/shards/demo/index.json")
    assert by_rule(planned_jobs(workdir, "data", config=str(config))) == {
        "shard": 1,
        "data_audit": 1,
        "data": 1,
    }
    snakemake(workdir, "data", config=str(config))
    assert {p: (sha256_file(p), p.stat().st_mtime_ns) for p in upstream} == before
    rewritten = {
        p.relative_to(workdir / "results/provenance").as_posix()
        for p, sha in records.items()
        if sha256_file(p) != sha
    }
    assert rewritten == {"shard/demo.json", "data_audit/all.json"}
    index = read_json(workdir / "results/shards/demo/index.json")
    assert index != old_index
    assert index["params"]["image_size"] == 48
    sizes = pq.read_table(
        sorted((workdir / "results/shards/demo").glob("train-*.parquet"))[0],
        columns=["height", "width"],
    ).to_pylist()
    assert sizes and all(max(r["height"], r["width"]) == 48 for r in sizes), sizes
    assert read_json(workdir / "results/audit/data.json")["ok"]
    record = read_json(workdir / "results/provenance/shard/demo.json")
    assert record["params"]["settings"]["image_size"] == 48
    assert planned_jobs(workdir, "data", config=str(config)) == []
    # The models trained on the old shards are now out of date, and Snakemake says so.
    assert by_rule(planned_jobs(workdir, config=str(config))) == downstream_of_corpus - Counter(
        {"shard": 1, "data_audit": 1}
    )


def test_ingest_option_of_one_dataset_reruns_that_dataset_only(
    mini_run, tmp_path, downstream_of_corpus
):
    workdir = copy_run(mini_run, tmp_path / "run")

    def edit(config):
        fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
        config["datasets"]["nih_demo"]["ingest"]["split_fractions"] = fractions

    jobs = planned_jobs(workdir, config=str(write_config(tmp_path / "nih.yaml", edit)))
    assert by_rule(jobs) == {
        "ingest": 1,
        "filter_frontal": 1,
        "synthesize_reports": 1,
        **downstream_of_corpus,
    }, jobs
    for rule in ("ingest", "filter_frontal", "synthesize_reports"):
        assert datasets_of(jobs, rule) == {"nih_demo"}, (rule, jobs)
    (ingest,) = [j for j in jobs if j["rule"] == "ingest"]
    assert ingest["reason"].startswith("Params have changed"), ingest


def test_model_hyperparameter_reruns_that_model_and_its_dependents_only(mini_run, tmp_path):
    """`dino.pretrain.lr` reruns the DINO model and what reads it: not CLIP, not the baseline."""
    workdir = copy_run(mini_run, tmp_path / "run")

    def edit(config):
        config["dino"]["pretrain"]["lr"] = 1.0e-3

    jobs = planned_jobs(workdir, config=str(write_config(tmp_path / "lr.yaml", edit)))
    (pretrain,) = [j for j in jobs if j["rule"] == "pretrain_dino"]
    assert pretrain["wildcards"] == "dino_model=dino", pretrain
    assert pretrain["reason"].startswith("Params have changed"), pretrain
    # What depends on the model, by Snakemake's own DAG: force the model's job and compare.
    dependents = planned_jobs(workdir, "--forcerun", "results/models/dino")
    assert by_rule(jobs) == by_rule(dependents), (jobs, dependents)
    assert {(j["rule"], j["wildcards"]) for j in jobs} == {
        (j["rule"], j["wildcards"]) for j in dependents
    }
    rules = by_rule(jobs)
    assert "pretrain_clip" not in rules and "shard" not in rules, jobs
    assert not set(PER_DATASET) & set(rules), jobs
    # The random-init baseline's benchmarks do not read the DINO model: they stay.
    assert not [j for j in jobs if "dino_random" in j["wildcards"]], jobs
    assert {"finetune_cls", "finetune_seg"} <= set(rules), jobs


def _src_copy_with_edit(tmp_path: Path, module_file: str) -> Path:
    """A copy of the cxrfoundry source in use, with a comment appended to one module."""
    src = Path(cxrfoundry.__file__).resolve().parents[1]
    copy = tmp_path / "src"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    target = copy / "cxrfoundry" / module_file
    target.write_text(target.read_text() + "\n# an edit that changes no behaviour\n")
    return copy


def _python_env(src: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize(
    ("module", "file", "importers"),
    [
        # ingest imports views (its DICOM/metadata view normalisation), so both rerun.
        ("cxrfoundry.data.views", "data/views.py", {"ingest", "filter_frontal"}),
        ("cxrfoundry.reports.template", "reports/template.py", {"synthesize_reports"}),
    ],
)
def test_src_module_change_reruns_the_rules_importing_it(
    mini_run, tmp_path, downstream_of_corpus, module, file, importers
):
    # The rules' code= params name these modules; the closure decides who is affected.
    rule_modules = {
        "download": ("cxrfoundry.data.download", "cxrfoundry.data.demo_sources"),
        "ingest": ("cxrfoundry.data.ingest",),
        "filter_frontal": ("cxrfoundry.data.views",),
        "synthesize_reports": ("cxrfoundry.reports.synthesize",),
        "shard": ("cxrfoundry.data.shards",),
        "data_audit": ("cxrfoundry.data.audit",),
    }
    assert {r for r, mods in rule_modules.items() if module in module_closure(mods)} == importers
    src = _src_copy_with_edit(tmp_path, file)
    env = _python_env(src)
    # PYTHONPATH must win over the editable install in every process Snakemake starts.
    probe = subprocess.run(
        [sys.executable, "-c", "import cxrfoundry.provenance as p; print(p.__file__)"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(probe.stdout.strip()).is_relative_to(src), probe.stdout

    workdir = copy_run(mini_run, tmp_path / "run")
    jobs = planned_jobs(workdir, env=env)
    expected = {rule: len(DATASETS) for rule in importers}
    # Every per-dataset rule after the first importer reruns because its input is rebuilt.
    first = min(PER_DATASET.index(r) for r in importers)
    expected.update({rule: len(DATASETS) for rule in PER_DATASET[first:]})
    assert by_rule(jobs) == {**expected, **downstream_of_corpus}, jobs
    for rule in importers:
        assert datasets_of(jobs, rule) == set(DATASETS), (rule, jobs)
    # Snakemake gives one reason per job: the first importer's is its params (the code hash);
    # later ones may name their rebuilt input first.
    for job in jobs:
        if job["rule"] == PER_DATASET[first]:
            assert job["reason"].startswith("Params have changed"), job
    # Control: the same run with the unedited source plans nothing.
    assert planned_jobs(workdir) == []


def test_a_target_builds_only_what_it_needs(tmp_path):
    """`snakemake results/frontal/nih_demo.parquet` in a fresh folder: nih_demo's three jobs."""
    target = "results/frontal/nih_demo.parquet"
    jobs = planned_jobs(tmp_path, target)
    assert by_rule(jobs) == {"download": 1, "ingest": 1, "filter_frontal": 1}, jobs
    assert all(j["wildcards"] == "dataset=nih_demo" for j in jobs), jobs

    snakemake(tmp_path, target)
    assert (tmp_path / target).is_file()
    records = sorted(
        p.relative_to(tmp_path / "results/provenance").as_posix()
        for p in (tmp_path / "results/provenance").rglob("*.json")
    )
    assert records == [
        "download/nih_demo.json",
        "filter_frontal/nih_demo.json",
        "ingest/nih_demo.json",
    ]
    assert sorted(p.name for p in (tmp_path / "resources/raw").iterdir()) == [
        "nih_demo",
        "nih_demo.manifest.json",
    ]
    assert not (tmp_path / "results/reports").exists()
    assert not (tmp_path / "results/shards").exists()
    assert (
        code_hash("cxrfoundry.data.views")
        == read_json(tmp_path / "results/provenance/filter_frontal/nih_demo.json")["code_sha256"]
    )
