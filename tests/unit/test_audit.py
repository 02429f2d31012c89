"""The reproducibility audit on a small but real chain of files and provenance records:
raw files + manifest -> ingest table -> shard folder -> benchmark table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cxrfoundry.audit import (
    audit,
    job_identity,
    recorded_stages,
    reproduce,
    run_time_markdown,
    run_times,
    snakemake_current_params,
    write_report,
)
from cxrfoundry.io import write_json
from cxrfoundry.pipeline import file_digest
from cxrfoundry.provenance import code_hash

CODE = {"modules": ["cxrfoundry.io"], "sha256": code_hash("cxrfoundry.io")}


def _record(root: Path, rule: str, key: str, wildcards, inputs, outputs, params) -> None:
    write_json(
        root / "results" / "provenance" / rule / f"{key}.json",
        {
            "rule": rule,
            "wildcards": wildcards,
            "inputs": {p: file_digest(str(root / p)) for p in inputs},
            "outputs": {p: file_digest(str(root / p)) for p in outputs},
            "params": params,
            "config_sha256": "c" * 64,
            "code_sha256": CODE["sha256"],
            "code_modules": CODE["modules"],
            "git_commit": None,
            "packages": {},
            "seed": 0,
            "host": "test",
            "slurm_job_id": None,
            "started": "2026-01-01T00:00:00+00:00",
            "ended": "2026-01-01T00:00:01+00:00",
            "mlflow_run_id": None,
            "log": None,
        },
    )


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, dict]:
    """Files and records of a four-job chain, as the pipeline adapter would write them."""
    from cxrfoundry.io import sha256_file

    root = tmp_path / "wf"
    raw = root / "resources" / "raw" / "demo"
    _write(raw / "p1" / "a.png", b"\x89PNG image a")
    _write(raw / "p2" / "b.png", b"\x89PNG image b")
    files = [
        {"path": p, "size": (raw / p).stat().st_size, "sha256": sha256_file(raw / p)}
        for p in ("p1/a.png", "p2/b.png")
    ]
    write_json(root / "resources/raw/demo.manifest.json", {"dataset": "demo", "files": files})
    _write(root / "results/manifests/demo.parquet", b"PAR1 manifest rows PAR1")
    _write(root / "results/shards/main/train-00000.parquet", b"PAR1 shard 0 PAR1")
    _write(root / "results/shards/main/index.json", b'{"shards": 1}')
    _write(root / "results/benchmarks/summary.csv", b"model,task,value\nclip,zeroshot,0.71\n")
    params = {
        "download": {"source": {"type": "phantom", "n": 2}, "code": CODE},
        "ingest": {"adapter": "mimic", "seed": 0, "code": CODE},
        "shard": {"rows_per_shard": 100, "image_size": 64, "code": CODE},
        "benchmark_table": {"metrics": ["auroc"], "alpha": 0.05, "code": CODE},
    }
    _record(root, "download", "demo", {"dataset": "demo"}, [],
            ["resources/raw/demo", "resources/raw/demo.manifest.json"],
            params["download"])  # fmt: skip
    _record(root, "ingest", "demo", {"dataset": "demo"}, ["resources/raw/demo"],
            ["results/manifests/demo.parquet"], params["ingest"])  # fmt: skip
    _record(root, "shard", "main", {"corpus": "main"}, ["results/manifests/demo.parquet"],
            ["results/shards/main"], params["shard"])  # fmt: skip
    _record(root, "benchmark_table", "all", {}, ["results/shards/main"],
            ["results/benchmarks/summary.csv"], params["benchmark_table"])  # fmt: skip
    current = {
        ("download", "dataset=demo"): params["download"],
        ("ingest", "dataset=demo"): params["ingest"],
        ("shard", "corpus=main"): params["shard"],
        ("benchmark_table", "all"): params["benchmark_table"],
    }
    return root, current


def test_clean_chain_passes(chain, tmp_path: Path) -> None:
    root, current = chain
    report = audit(root, current_params=current)
    assert report.ok, report.to_markdown()
    assert not report.findings
    assert (report.records, report.raw_files_checked) == (4, 2)
    # 5 outputs; 3 inputs, each traced to the record that produced it.
    assert (report.outputs_checked, report.inputs_checked) == (5, 3)
    json_path, md_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text())["ok"] is True
    assert "PASS" in md_path.read_text()


@pytest.mark.parametrize(
    ("victim", "kind"),
    [
        ("results/benchmarks/summary.csv", "output_modified"),
        ("results/manifests/demo.parquet", "output_modified"),
        ("results/shards/main/train-00000.parquet", "output_modified"),
        ("resources/raw/demo/p2/b.png", "raw_modified"),
        ("resources/raw/demo.manifest.json", "output_modified"),
    ],
)
def test_flipped_byte_fails_naming_the_file(chain, tmp_path: Path, victim: str, kind: str) -> None:
    root, current = chain
    path = root / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = audit(root, current_params=current)
    assert not report.ok
    named = {f.path for f in report.errors if f.kind == kind}
    # A file inside an output folder is reported as that folder (the recorded unit).
    expected = "results/shards/main" if victim.startswith("results/shards/") else victim
    assert expected in named, report.to_markdown()
    _, md = write_report(report, tmp_path / "out")
    assert "FAIL" in md.read_text() and expected in md.read_text()


def test_changed_param_is_stale_naming_the_param(chain) -> None:
    root, current = chain
    current[("shard", "corpus=main")] = {**current[("shard", "corpus=main")], "image_size": 128}
    report = audit(root, current_params=current)
    assert report.ok  # stale is reported, not failed
    (finding,) = report.stale
    assert finding.kind == "stale_params" and finding.record.endswith("shard/main.json")
    assert finding.details["params"] == ["image_size"]
    assert finding.details["recorded"] == {"image_size": 64}
    assert "image_size" in report.to_markdown()


def test_nested_param_change_is_named_by_its_path(chain) -> None:
    root, current = chain
    current[("download", "dataset=demo")] = {
        **current[("download", "dataset=demo")],
        "source": {"type": "phantom", "n": 3},
    }
    report = audit(root, current_params=current)
    assert [f.details["params"] for f in report.stale] == [["source.n"]]


def test_changed_code_is_stale(chain) -> None:
    root, current = chain
    report = audit(root, current_params=current, stale=False)
    assert not report.stale
    from cxrfoundry.audit import AuditReport, find_stale, load_records

    report = AuditReport(workdir=str(root))
    find_stale(load_records(root), report, current_params=current, code_hash=lambda *m: "0" * 64)
    assert len(report.stale) == 4 and all(f.kind == "stale_code" for f in report.stale)
    assert "cxrfoundry.io" in report.stale[0].message


def test_swapped_input_file_fails_naming_the_input(chain) -> None:
    root, current = chain
    # Another, valid-looking table takes the place of the ingest output the shard job read.
    swapped = root / "results/manifests/demo.parquet"
    swapped.write_bytes(b"PAR1 some other dataset's rows PAR1")
    report = audit(root, current_params=current)
    assert not report.ok
    assert "results/manifests/demo.parquet" in {f.path for f in report.errors}


def test_input_that_differs_from_its_producers_output_fails(chain) -> None:
    """The consumer's record says it read other bytes than the producer's record wrote."""
    root, current = chain
    rec_path = root / "results/provenance/shard/main.json"
    rec = json.loads(rec_path.read_text())
    rec["inputs"]["results/manifests/demo.parquet"] = "f" * 64
    write_json(rec_path, rec)
    report = audit(root, current_params=current)
    (err,) = report.errors
    assert err.kind == "input_mismatch" and err.path == "results/manifests/demo.parquet"
    assert err.record == "results/provenance/shard/main.json"


def test_missing_record_breaks_the_chain(chain) -> None:
    root, current = chain
    (root / "results/provenance/ingest/demo.json").unlink()
    del current[("ingest", "dataset=demo")]
    report = audit(root, current_params=current)
    (err,) = report.errors
    assert err.kind == "broken_chain" and err.path == "results/manifests/demo.parquet"


def test_target_ancestry_and_unknown_target(chain) -> None:
    root, current = chain
    report = audit(root, current_params=current, target="results/manifests/demo.parquet")
    assert report.ok and report.records == 2
    report = audit(root, current_params=current, target="results/benchmarks/nope.csv")
    assert not report.ok and report.errors[0].kind == "no_record"


# ------------------------------------------------------------------ with a real Snakemake run
SNAKEFILE = textwrap.dedent(
    """
    import json
    from cxrfoundry.pipeline import file_digest

    def record(rule, wildcards, input, output, params):
        key = "__".join(wildcards.values()) or "all"
        path = f"results/provenance/{rule}/{key}.json"
        import os
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            json.dump({"rule": rule, "wildcards": dict(wildcards),
                       "inputs": {p: file_digest(p) for p in input},
                       "outputs": {p: file_digest(p) for p in output},
                       "params": dict(params.items())}, fh)

    rule upper:
        input: "data/{name}.txt"
        output: "results/upper/{name}.txt"
        params: suffix=config.get("suffix", "!")
        run:
            text = open(input[0]).read().upper() + params.suffix
            open(output[0], "w").write(text)
            record(rule, dict(wildcards), list(input), list(output), params)
    """
)


def test_snakemake_params_and_reproduce(tmp_path: Path) -> None:
    wf = tmp_path / "wf"
    _write(wf / "data" / "x.txt", b"hello")
    (wf / "Snakefile").write_text(SNAKEFILE)
    subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "results/upper/x.txt", "--quiet"],
        cwd=wf, check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    current = snakemake_current_params(wf, targets=["results/upper/x.txt"])
    assert current == {("upper", "name=x"): {"suffix": "!"}}
    # The audit reads the current params from the workflow itself.
    assert audit(wf, check_raw=False).ok

    # Reproduce from the recorded inputs in scratch: deterministic -> identical.
    result = reproduce("results/upper/x.txt", wf, scratch=tmp_path / "scratch")
    assert result["ok"], result
    assert result["comparisons"] == [
        {"path": "results/upper/x.txt", "result": "identical", "detail": "bitwise equal (sha256)"}
    ]
    # A tampered output no longer reproduces, and the comparison names it.
    (wf / "results/upper/x.txt").write_text("HELLO?")
    rec = wf / "results/provenance/upper/x.json"
    data = json.loads(rec.read_text())
    data["outputs"]["results/upper/x.txt"] = file_digest(str(wf / "results/upper/x.txt"))
    rec.write_text(json.dumps(data))
    shutil.rmtree(tmp_path / "scratch")
    result = reproduce("results/upper/x.txt", wf, scratch=tmp_path / "scratch")
    assert not result["ok"] and result["comparisons"][0]["result"] == "differs"
    with pytest.raises(LookupError, match="no provenance record"):
        reproduce("results/upper/none.txt", wf)


def test_compare_within_tolerance_numbers_tensors_and_timing(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from cxrfoundry.audit import compare_within_tolerance

    def model(folder: Path, weight: torch.Tensor, metrics: dict) -> Path:
        folder.mkdir()
        save_file({"w": weight}, str(folder / "model.safetensors"))
        (folder / "metrics.json").write_text(json.dumps(metrics))
        torch.save({"step": 3, "rng": torch.get_rng_state()}, folder / "state.pt")
        return folder

    w = torch.linspace(0, 1, 16)
    base = model(tmp_path / "a", w, {"loss": 0.5, "samples_per_s": 10.0, "wall_s": 3.0})
    # Only timing differs, and the weights by less than the tolerance: equal.
    same = model(
        tmp_path / "b", w + 1e-7, {"loss": 0.5 + 1e-9, "samples_per_s": 99.0, "wall_s": 7.0}
    )
    ok, detail = compare_within_tolerance(base, same, rtol=1e-4, atol=1e-5)
    assert ok, detail
    # A weight beyond the tolerance, a result value, or a missing key: not equal.
    far = model(tmp_path / "c", w + 1e-2, {"loss": 0.5, "samples_per_s": 10.0, "wall_s": 3.0})
    assert compare_within_tolerance(base, far, 1e-4, 1e-5) == (
        False,
        "model.safetensors: values differ beyond rtol=0.0001, atol=1e-05",
    )
    loss = model(tmp_path / "d", w, {"loss": 0.6, "samples_per_s": 10.0, "wall_s": 3.0})
    assert not compare_within_tolerance(base, loss, 1e-4, 1e-5)[0]
    fewer = model(tmp_path / "e", w, {"samples_per_s": 10.0, "wall_s": 3.0})
    assert not compare_within_tolerance(base, fewer, 1e-4, 1e-5)[0]


def test_job_identity_ignores_wildcard_order():
    # Records keep wildcards as sorted JSON; Snakemake lists them in output-pattern order.
    assert job_identity({"model": "dino", "mode": "linear", "corpus": "demo"}) == job_identity(
        {"corpus": "demo", "mode": "linear", "model": "dino"}
    )
    assert job_identity({"model": "a", "corpus": "b"}) != job_identity(
        {"model": "b", "corpus": "a"}
    )
    assert job_identity({}) == "all"


def test_run_times_sum_jobs_per_stage_and_span_first_start_to_last_end():
    def job(rule: str, start: str, end: str) -> dict:
        day = "2026-01-01T"
        return {"rule": rule, "started": f"{day}{start}+00:00", "ended": f"{day}{end}+00:00"}

    records = {
        "download/a": job("download", "10:00:00", "10:00:30"),
        "download/b": job("download", "10:00:10", "10:01:00"),  # overlaps a: two cores
        "shard/demo": job("shard", "10:01:00", "10:02:00"),
        "probe/x": job("probe", "10:02:00", "10:05:00"),
        "broken/y": {"rule": "broken", "started": "yesterday", "ended": None},
    }
    rows = run_times(records, {"download": "data", "shard": "data"})
    by_stage = {r["stage"]: r for r in rows}
    assert [r["stage"] for r in rows] == ["data", "probe", "all"]  # first start, then all
    assert by_stage["data"]["jobs"] == 3
    assert by_stage["data"]["job_s"] == 30 + 50 + 60
    assert by_stage["data"]["span_s"] == 120
    assert by_stage["probe"] == {
        "stage": "probe",  # a rule without a stage is its own
        "jobs": 1,
        "job_s": 180,
        "first_start": "2026-01-01T10:02:00+00:00",
        "last_end": "2026-01-01T10:05:00+00:00",
        "span_s": 180,
    }
    assert by_stage["all"]["jobs"] == 4 and by_stage["all"]["span_s"] == 300
    assert by_stage["all"]["job_s"] == 320
    table = "\n".join(run_time_markdown(rows))
    assert "| data | 3 | 2 min 20 s | 2 min 00 s |" in table
    assert run_times({}, {}) == []
    # Outside Snakemake (the CLI) the map comes from the audit rule's recorded params.
    records["audit/all"] = {**job("audit", "10:05:00", "10:05:01"), "params": {"stages": {}}}
    assert recorded_stages(records) == {}
    records["audit/all"]["params"]["stages"] = {"download": "data", "shard": "data"}
    assert recorded_stages(records) == {"download": "data", "shard": "data"}
    assert recorded_stages({"probe/x": records["probe/x"]}) == {}
