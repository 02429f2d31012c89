"""Row conservation across the data stages: nothing is dropped silently.

Each stage writes its own audit (ingest, filter_frontal, synthesize_reports) or index (shard) with
``rows_in`` and where those rows went. This module checks, per dataset, that every stage's counts
add up and that each stage's input equals what the previous stage kept, then writes one summary.
A broken chain is an error that names the dataset, the stage and the numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrfoundry.io import read_json, write_json

log = logging.getLogger(__name__)


class ConservationError(ValueError):
    """Row counts of a stage do not add up."""


def _check(condition: bool, message: str, problems: list[str]) -> None:
    if not condition:
        problems.append(message)


def audit_data(
    *,
    ingest: Sequence[Path],
    frontal: Sequence[Path],
    reports: Sequence[Path],
    shards: Sequence[Path],
    datasets: Sequence[str],
    corpora: Sequence[str],
    out_path: Path,
) -> dict[str, Any]:
    """Check row conservation for every dataset and corpus and write the summary to ``out_path``.

    The per-dataset lists are aligned with ``datasets``; ``shards`` with ``corpora`` (each a shard
    folder holding ``index.json``). Raises :class:`ConservationError` listing every violation.
    """
    problems: list[str] = []
    per_dataset: dict[str, Any] = {}
    for name, ingest_path, frontal_path, reports_path in zip(
        datasets, ingest, frontal, reports, strict=True
    ):
        ing, fro, rep = read_json(ingest_path), read_json(frontal_path), read_json(reports_path)
        _check(
            ing["rows_in"] == ing["rows_kept"] + ing["rows_rejected"],
            f"{name}: ingest rows_in {ing['rows_in']} != kept {ing['rows_kept']} + rejected "
            f"{ing['rows_rejected']} ({ingest_path})",
            problems,
        )
        _check(
            fro["rows_in"] == ing["rows_kept"],
            f"{name}: filter_frontal read {fro['rows_in']} rows but ingest kept "
            f"{ing['rows_kept']} ({frontal_path})",
            problems,
        )
        _check(
            fro["rows_in"] == fro["rows_frontal"] + fro["rows_excluded"],
            f"{name}: filter_frontal rows_in {fro['rows_in']} != frontal {fro['rows_frontal']} + "
            f"excluded {fro['rows_excluded']} ({frontal_path})",
            problems,
        )
        _check(
            rep["rows_in"] == fro["rows_frontal"] == rep["rows_out"],
            f"{name}: reports rows_in {rep['rows_in']} / rows_out {rep['rows_out']} differ from "
            f"the {fro['rows_frontal']} frontal rows ({reports_path})",
            problems,
        )
        per_dataset[name] = {
            "ingest": {k: ing[k] for k in ("rows_in", "rows_kept", "rows_rejected")},
            "rejects_by_reason": ing.get("rejects_by_reason", {}),
            "filter_frontal": {k: fro[k] for k in ("rows_in", "rows_frontal", "rows_excluded")},
            "reports": {"rows_in": rep["rows_in"], "rows_out": rep["rows_out"]},
        }

    per_corpus: dict[str, Any] = {}
    frontal_rows = {name: per_dataset[name]["filter_frontal"]["rows_frontal"] for name in datasets}
    for corpus, shard_dir in zip(corpora, shards, strict=True):
        index = read_json(Path(shard_dir) / "index.json")
        counts = index["counts"]
        expected = sum(frontal_rows[name] for name in index["datasets"])
        _check(
            counts["rows_in"] == expected,
            f"corpus {corpus}: shard rows_in {counts['rows_in']} != {expected} frontal rows of "
            f"its datasets",
            problems,
        )
        _check(
            counts["rows_in"] == counts["rows_written"] + counts["rows_rejected"],
            f"corpus {corpus}: shard rows_in {counts['rows_in']} != written "
            f"{counts['rows_written']} + rejected {counts['rows_rejected']}",
            problems,
        )
        per_corpus[corpus] = counts

    totals = {
        "rows_raw": sum(d["ingest"]["rows_in"] for d in per_dataset.values()),
        "rows_rejected_ingest": sum(d["ingest"]["rows_rejected"] for d in per_dataset.values()),
        "rows_excluded_views": sum(
            d["filter_frontal"]["rows_excluded"] for d in per_dataset.values()
        ),
        "rows_frontal": sum(frontal_rows.values()),
        "rows_sharded": sum(c["rows_written"] for c in per_corpus.values()),
        "rows_rejected_shard": sum(c["rows_rejected"] for c in per_corpus.values()),
    }
    summary = {"datasets": per_dataset, "corpora": per_corpus, "totals": totals, "ok": not problems}
    if problems:
        raise ConservationError("row counts do not add up:\n  " + "\n  ".join(problems))
    write_json(out_path, summary)
    log.info("data audit: %s", totals)
    return summary
