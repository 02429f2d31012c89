"""The reports stage against real HTTP servers on loopback (tests/llm_server.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cxrfoundry.reports.cache import ResponseCache
from cxrfoundry.reports.endpoint import EndpointError
from cxrfoundry.reports.synthesize import (
    PrivacyError,
    audit_metrics,
    synthesize_reports,
    synthesize_reports_files,
)
from cxrfoundry.reports.validate import random_label_rows
from cxrfoundry.schema import MANIFEST_SCHEMA, REPORTS_SCHEMA, conform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llm_server import ScriptedLLMServer

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "config" / "prompts"
SECRET = "ZEBRA-ORIGINAL-TEXT"
ALL_FAULTS = {
    "hallucinate": 0.15,
    "omit": 0.15,
    "wrong_sex": 0.05,
    "rate_limit": 0.08,
    "error500": 0.08,
    "hang": 0.04,
    "garbage": 0.08,
    "empty": 0.05,
}


def manifest(n: int, seed: int = 1, originals: int = 2):
    rows = random_label_rows(n, seed)
    for i, row in enumerate(rows):
        row.update(
            image_id=f"demo/img{i}",
            dataset="demo",
            patient_id=f"pid-{i}-x",
            study_id=f"s{i}",
            image_path=f"files/p{i}.png",
            view_source="metadata",
            labels_extra="{}",
            split="train",
            report=f"FINDINGS: {SECRET} no pneumothorax. IMPRESSION: ok."
            if i < originals
            else None,
        )
    return conform(rows, MANIFEST_SCHEMA)


def cfg(url: str, **qc) -> dict:
    return {
        "backend": "openai",
        "prompts_dir": str(PROMPTS),
        "openai": {
            "base_url": url,
            "model": "scripted-7b",
            "timeout": 0.5,
            "backoff": 0.01,
            "backoff_max": 0.05,
            "max_retries": 3,
            "concurrency": 4,
            "api_key_env": "CXR_TEST_LLM_KEY",
        },
        "qc": {"enabled": True, "max_repair_rounds": 2, **qc},
    }


def test_faults_every_row_ends_with_report_and_outcome(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CXR_TEST_LLM_KEY", "sk-very-secret-key")
    caplog.set_level(logging.DEBUG)
    config = {"faults": ALL_FAULTS, "qc": "fix_on_repair", "hang_seconds": 1.5}
    m = manifest(40)
    with ScriptedLLMServer(config) as server:
        table, audit = synthesize_reports(
            m, cfg(server.url), cache_dir=tmp_path, dataset_policy="local_only", seed=3
        )
        requests = server.requests
    assert table.schema == REPORTS_SCHEMA and table.num_rows == 40
    assert audit["rows_in"] == audit["rows_out"] == 40
    rows = table.to_pylist()
    assert all(r["report"] and r["qc_status"] in ("pass", "repaired", "fallback") for r in rows)
    assert [r["image_id"] for r in rows] == m.column("image_id").to_pylist()
    # Originals are kept and never sent; no identifiers or paths leave the machine.
    assert [r["report_source"] for r in rows[:2]] == ["original", "original"]
    sent = json.dumps([q["body"] for q in requests])
    for forbidden in (SECRET, "pid-", "demo/img", "files/p", "sk-very-secret-key"):
        assert forbidden not in sent
    assert all(q["auth"] for q in requests)  # the key was sent as a header...
    assert "sk-very-secret-key" not in caplog.text  # ...and never logged
    # Every fault happened, was retried or caught, and is visible in the audit.
    faults = Counter(q["fault"] for q in requests)
    assert all(faults[f] > 0 for f in ALL_FAULTS), faults
    errors = audit["requests"]["errors"]
    assert errors["rate_limited"] and errors["timeout"] and errors["malformed"] and errors["empty"]
    assert errors["http_500"] and audit["requests"]["retries"] >= sum(errors.values()) - 0
    # Hallucinated / omitted findings were caught by the checker and repaired.
    assert audit["qc_status"]["repaired"] >= faults["hallucinate"] + faults["omit"] - 2 > 0
    assert audit["flag_kinds"].get("repaired:unsupported", 0) > 0
    assert audit["flag_kinds"].get("repaired:missing_positive", 0) > 0
    llm_rows = [r for r in rows if r["report_source"] == "llm"]
    assert all(r["llm_model"] == "scripted-7b" and len(r["prompt_sha256"]) == 64 for r in llm_rows)
    assert all(json.loads(r["qc_flags"]) == [] for r in llm_rows if r["qc_status"] == "pass")
    assert audit_metrics(audit)["qc_status.repaired"] == audit["qc_status"]["repaired"]


def test_uncorrectable_drafts_fall_back_to_template(tmp_path) -> None:
    with ScriptedLLMServer({"faults": {"hallucinate": 0.5, "omit": 0.5}, "qc": "echo"}) as server:
        table, audit = synthesize_reports(
            manifest(12, originals=0),
            cfg(server.url),
            cache_dir=tmp_path,
            dataset_policy="public",
            seed=1,
        )
        kinds = Counter(q["kind"] for q in server.requests)
    rows = table.to_pylist()
    omitted_nothing = [r for r in rows if r["qc_status"] == "pass"]  # rows with no positive
    fallback = [r for r in rows if r["qc_status"] == "fallback"]
    assert len(fallback) + len(omitted_nothing) == 12 and fallback
    for r in fallback:
        flags = json.loads(r["qc_flags"])
        assert r["report_source"] == "template" and any(f.startswith("rejected:") for f in flags)
    # Bounded: max_repair_rounds (2) per row; an echoed draft makes round 2 identical to
    # round 1, which the cache answers without a request.
    assert audit["repairs"]["rounds_total"] == 2 * len(fallback)
    assert kinds["repair"] == len(fallback)


def test_retry_after_is_honoured_and_permanent_failure_falls_back(tmp_path) -> None:
    config = {"faults": {"rate_limit": 1.0}, "retry_after": 0.3}
    with ScriptedLLMServer(config) as server:
        start = time.monotonic()
        _, audit = synthesize_reports(
            manifest(2, originals=0),
            cfg(server.url, enabled=False),
            cache_dir=tmp_path / "a",
            dataset_policy="public",
            seed=1,
        )
        assert time.monotonic() - start >= 0.3  # not the 0.01 s backoff
        assert audit["requests"]["errors"] == {"rate_limited": 2}
        assert audit["report_source"]["llm"] == 2
        server.configure(faults={"error500": 1.0}, transient_attempts=99)
        table, audit = synthesize_reports(
            manifest(3, seed=9, originals=0),
            cfg(server.url),
            cache_dir=tmp_path / "b",
            dataset_policy="public",
            seed=1,
        )
    assert audit["requests"]["requests_sent"] == 3 * 4  # 1 try + 3 retries per row
    assert audit["qc_status"]["fallback"] == 3
    assert all(
        json.loads(f) == ["llm_error:writer:http_500"] for f in table["qc_flags"].to_pylist()
    )


def test_cache_rerun_sends_nothing_and_is_byte_identical(tmp_path) -> None:
    m = manifest(16)
    pq.write_table(m, tmp_path / "frontal.parquet")
    outs = []
    with ScriptedLLMServer(
        {"faults": {"omit": 0.3, "garbage": 0.2}, "qc": "fix_on_repair"}
    ) as server:
        for run in range(2):
            before = len(server.requests)
            metrics = synthesize_reports_files(
                tmp_path / "frontal.parquet",
                cfg(server.url),
                reports_path=tmp_path / f"r{run}.parquet",
                audit_path=tmp_path / f"a{run}.json",
                cache_dir=tmp_path / "cache",
                dataset_policy="local_only",
                seed=2,
            )
            outs.append((tmp_path / f"r{run}.parquet").read_bytes())
            assert metrics["requests.requests_sent"] == len(server.requests) - before
        assert metrics["requests.requests_sent"] == 0 and metrics["requests.cache_hits"] > 0
    assert outs[0] == outs[1]
    assert len(ResponseCache(tmp_path / "cache")) == metrics["requests.cache_hits"]
    # The cache is shared: another dataset with the same metadata reuses it.
    with ScriptedLLMServer() as server:
        synthesize_reports(
            m, cfg(server.url), cache_dir=tmp_path / "cache", dataset_policy="public", seed=2
        )
        assert server.requests == []


def test_privacy_refusal_before_any_request(tmp_path) -> None:
    m = manifest(3, originals=0)
    with ScriptedLLMServer() as server:
        remote = cfg("http://llm.example.org/v1")
        with pytest.raises(PrivacyError, match=r"local_only.*llm\.example\.org"):
            synthesize_reports(m, remote, cache_dir=tmp_path, dataset_policy="local_only", seed=1)
        qc_remote = cfg(server.url, base_url="https://api.example.com/v1")
        with pytest.raises(PrivacyError, match=r"api\.example\.com"):
            synthesize_reports(
                m, qc_remote, cache_dir=tmp_path, dataset_policy="local_only", seed=1
            )
        # policy none: template only, nothing sent, even with an allowed endpoint.
        table, audit = synthesize_reports(
            m, cfg(server.url), cache_dir=tmp_path, dataset_policy="none", seed=1
        )
        assert set(table["report_source"].to_pylist()) == {"template"}
        assert audit["backend"] == "template"
        assert server.requests == []
        with pytest.raises(ValueError, match="llm_policy"):
            synthesize_reports(
                m, cfg(server.url), cache_dir=tmp_path, dataset_policy="open", seed=1
            )
    # An explicitly allowed site host passes the policy (the key check then runs).
    allowed = cfg("http://llm.internal.site/v1")
    allowed["openai"]["allowed_hosts"] = ["llm.internal.site"]
    with pytest.raises(ValueError, match="CXR_TEST_LLM_KEY"):
        synthesize_reports(m, allowed, cache_dir=tmp_path, dataset_policy="local_only", seed=1)


def test_template_backend_is_deterministic(tmp_path) -> None:
    m = manifest(25)
    a, audit = synthesize_reports(m, {}, cache_dir=tmp_path, dataset_policy="local_only", seed=4)
    b, _ = synthesize_reports(m, {}, cache_dir=tmp_path, dataset_policy="local_only", seed=4)
    assert a.equals(b)
    assert audit["report_source"] == {"original": 2, "llm": 0, "template": 23}
    assert a["report_original"].to_pylist()[:2] == m["report"].to_pylist()[:2]
    assert audit["requests"]["requests_sent"] == 0


def test_bad_input_names_the_file(tmp_path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"x\.parquet"):
        synthesize_reports_files(
            tmp_path / "x.parquet",
            {},
            reports_path=tmp_path / "r.parquet",
            audit_path=tmp_path / "a.json",
            cache_dir=tmp_path,
            dataset_policy="public",
            seed=0,
        )
    pq.write_table(manifest(2).drop_columns(["view"]), tmp_path / "y.parquet")
    with pytest.raises(ValueError, match=r"y.parquet.*'view'"):
        synthesize_reports_files(
            tmp_path / "y.parquet",
            {},
            reports_path=tmp_path / "r.parquet",
            audit_path=tmp_path / "a.json",
            cache_dir=tmp_path,
            dataset_policy="public",
            seed=0,
        )


RUNNER = textwrap.dedent(
    """
    import sys, json, pyarrow.parquet as pq
    from cxrfoundry.reports.synthesize import synthesize_reports_files
    cfg = json.loads(sys.argv[1])
    synthesize_reports_files(sys.argv[2], cfg, reports_path=sys.argv[3], audit_path=sys.argv[4],
                             cache_dir=sys.argv[5], dataset_policy="public", seed=5)
    """
)


def test_resume_after_kill_sends_only_missing_requests(tmp_path) -> None:
    m = manifest(24, originals=0)
    pq.write_table(m, tmp_path / "frontal.parquet")
    with ScriptedLLMServer({"latency": 0.05}) as server:
        config = cfg(server.url)
        config["openai"]["concurrency"] = 2
        # Reference: an uninterrupted run with its own cache.
        synthesize_reports_files(
            tmp_path / "frontal.parquet",
            config,
            reports_path=tmp_path / "ref.parquet",
            audit_path=tmp_path / "ref.json",
            cache_dir=tmp_path / "ref_cache",
            dataset_policy="public",
            seed=5,
        )
        total = len(server.requests)
        assert total == 2 * 24  # writer + QC per row, no faults
        cache = ResponseCache(tmp_path / "cache")
        args = [str(tmp_path / n) for n in ("frontal.parquet", "out.parquet", "out.json", "cache")]
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, json.dumps(config), *args],
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while len(cache) < total // 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        assert not (tmp_path / "out.parquet").exists()  # nothing that looks finished
        cached = len(cache)
        assert 0 < cached < total
        before = len(server.requests)
        synthesize_reports_files(
            tmp_path / "frontal.parquet",
            config,
            reports_path=tmp_path / "out.parquet",
            audit_path=tmp_path / "out.json",
            cache_dir=tmp_path / "cache",
            dataset_policy="public",
            seed=5,
        )
        assert len(server.requests) - before == total - cached
    assert (tmp_path / "out.parquet").read_bytes() == (tmp_path / "ref.parquet").read_bytes()


def test_managed_endpoint_lifecycle(tmp_path) -> None:
    from cxrfoundry.reports.endpoint import managed_endpoint

    log_file = tmp_path / "requests.jsonl"
    command = (
        f"{sys.executable} {ROOT / 'tests' / 'llm_server.py'} --port {{port}} --log {log_file}"
    )
    config = cfg("http://unused.example.org/v1")  # replaced by the managed loopback URL
    config["openai"]["managed"] = {"command": command, "startup_timeout": 30}
    _table, audit = synthesize_reports(
        manifest(4, originals=1),
        config,
        cache_dir=tmp_path / "cache",
        dataset_policy="local_only",
        seed=1,
    )
    assert audit["report_source"]["llm"] == 3
    assert len(log_file.read_text().splitlines()) == audit["requests"]["requests_sent"] == 6
    # Stopped afterwards: the server's port no longer answers.
    lines = (tmp_path / "cache" / "managed_endpoint.log").read_text()
    port = int(lines.split(":")[-1].split("/")[0])
    import socket

    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    # A command that dies is reported with its output, and nothing is left running.
    bad = {
        "command": f"{sys.executable} -c 'import sys; print(\"no gpu\"); sys.exit(3)'",
        "startup_timeout": 10,
    }
    with (
        pytest.raises(EndpointError, match=r"(?s)exited with 3.*no gpu"),
        managed_endpoint(bad, model="m", log_dir=tmp_path),
    ):
        pass
    # Synthesis failing inside the block still stops the server (process group).
    with (
        pytest.raises(RuntimeError, match="inside"),
        managed_endpoint(
            {"command": command, "startup_timeout": 30}, model="m", log_dir=tmp_path / "x"
        ) as url,
    ):
        port2 = int(url.split(":")[-1].split("/")[0])
        raise RuntimeError("inside")
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port2), timeout=1):
        pass
