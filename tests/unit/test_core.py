"""Unit tests of the shared core: schema contracts, atomic io, config merging, provenance, secrets,
data audit."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from cxrfoundry import io, provenance, schema
from cxrfoundry.config import deep_merge
from cxrfoundry.data.audit import ConservationError, audit_data
from cxrfoundry.pipeline import SecretFilter, file_digest, job_key, secret_values


def test_conform_fills_nullable_and_orders_columns():
    table = schema.conform(
        [
            {
                "split": "train",
                "image_id": "d/1",
                "dataset": "d",
                "patient_id": "p",
                "study_id": "s",
                "image_path": "a.png",
                "view": "PA",
                "view_source": "metadata",
                "labels_extra": "{}",
                "extra_column": 1,
            }
        ],
        schema.MANIFEST_SCHEMA,
    )
    assert table.schema == schema.MANIFEST_SCHEMA
    assert table.column("cardiomegaly").type == pa.int8()
    assert table.column("age").null_count == 1


def test_conform_names_missing_required_column():
    with pytest.raises(ValueError, match="image_id"):
        schema.conform([{"dataset": "d"}], schema.MANIFEST_SCHEMA)


def test_findings_are_the_14_chexpert_labels():
    assert len(schema.FINDINGS) == 14
    assert schema.FINDING_COLUMN_BY_NAME["Pleural Effusion"] == "pleural_effusion"


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), io.atomic_write(target) as handle:
        handle.write(b"partial")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_survives_sigkill(tmp_path):
    """A process killed mid-write leaves only a hidden temp file, never the target."""
    target = tmp_path / "big.bin"
    code = (
        "import os, signal\n"
        "from cxrfoundry.io import atomic_write\n"
        f"with atomic_write({str(target)!r}) as f:\n"
        "    f.write(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=False)
    assert not target.exists()


def test_write_json_is_deterministic(tmp_path):
    io.write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    io.write_json(tmp_path / "b.json", {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_sha256_tree_changes_with_any_byte(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("hello")
    before = io.sha256_tree(tmp_path / "d")
    (tmp_path / "d" / "x.txt").write_text("hellp")
    assert io.sha256_tree(tmp_path / "d") != before


def test_code_hash_follows_imports_transitively():
    closure = provenance.module_closure(("cxrfoundry.data.audit",))
    assert "cxrfoundry.io" in closure  # imported by data.audit
    assert "cxrfoundry.data" in closure  # parent package __init__
    assert provenance.code_hash("cxrfoundry.data.audit") != provenance.code_hash("cxrfoundry.io")


def test_code_hash_rejects_foreign_modules():
    with pytest.raises(ValueError):
        provenance.code_hash("numpy")


def test_redact_masks_secrets_but_keeps_env_var_names():
    cfg = {
        "auth": {"password": "hunter2", "password_env": "PHYSIONET_PASSWORD"},
        "url": "https://user:pw@example.org/x",
        "api_key": "sk-123",
    }
    red = provenance.redact(cfg)
    assert red["auth"]["password"] == "***"
    assert red["auth"]["password_env"] == "PHYSIONET_PASSWORD"
    assert red["api_key"] == "***"
    assert "pw" not in red["url"]
    assert "hunter2" not in json.dumps(red)


def test_secret_filter_masks_env_values_in_logs(monkeypatch, caplog):
    monkeypatch.setenv("MY_LLM_KEY", "sk-very-secret-value")
    secrets = secret_values({"reports": {"openai": {"api_key_env": "MY_LLM_KEY"}}})
    logger = logging.getLogger("test.secret")
    logger.addFilter(SecretFilter(secrets))
    with caplog.at_level(logging.INFO):
        logger.info("calling with key %s", os.environ["MY_LLM_KEY"])
    assert "sk-very-secret-value" not in caplog.text
    assert "***" in caplog.text


def test_job_key_and_digest(tmp_path):
    assert job_key({}) == "all"
    assert job_key({"dataset": "nih", "split": "a/b"}) == "nih__a_b"
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "f").write_text("1")
    assert file_digest(str(raw)) == io.sha256_tree(raw)
    (tmp_path / "raw.manifest.json").write_text("{}")
    assert file_digest(str(raw)).startswith("manifest:")
    assert file_digest(str(tmp_path / "missing")) is None


def _write_audits(tmp_path, *, frontal_in=90, shard_in=80):
    io.write_json(
        tmp_path / "ingest.json",
        {"rows_in": 100, "rows_kept": 90, "rows_rejected": 10, "rejects_by_reason": {"x": 10}},
    )
    io.write_json(
        tmp_path / "frontal.json", {"rows_in": frontal_in, "rows_frontal": 80, "rows_excluded": 10}
    )
    io.write_json(tmp_path / "reports.json", {"rows_in": 80, "rows_out": 80})
    (tmp_path / "shards").mkdir(exist_ok=True)
    io.write_json(
        tmp_path / "shards" / "index.json",
        {
            "datasets": ["d"],
            "counts": {"rows_in": shard_in, "rows_written": shard_in - 1, "rows_rejected": 1},
        },
    )


def _audit(tmp_path):
    return audit_data(
        ingest=[tmp_path / "ingest.json"],
        frontal=[tmp_path / "frontal.json"],
        reports=[tmp_path / "reports.json"],
        shards=[tmp_path / "shards"],
        datasets=["d"],
        corpora=["c"],
        out_path=tmp_path / "audit.json",
    )


def test_data_audit_accepts_conserved_counts(tmp_path):
    _write_audits(tmp_path)
    summary = _audit(tmp_path)
    assert summary["ok"]
    assert summary["totals"]["rows_sharded"] == 79


def test_data_audit_names_a_broken_chain(tmp_path):
    _write_audits(tmp_path, frontal_in=89)
    with pytest.raises(ConservationError, match="d: filter_frontal read 89"):
        _audit(tmp_path)
    assert not (tmp_path / "audit.json").exists()


def test_deep_merge_merges_nested_mappings_and_leaves_the_base_alone():
    base = {"lr": 1.0, "augment": {"a": 1, "b": 2}}
    out = deep_merge(base, {"augment": {"b": 3}, "epochs": 2})
    assert out == {"lr": 1.0, "augment": {"a": 1, "b": 3}, "epochs": 2}
    assert base == {"lr": 1.0, "augment": {"a": 1, "b": 2}}
