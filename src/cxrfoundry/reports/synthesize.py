"""The reports stage: keep original reports, write missing ones, check (and repair) them all.

Per row of a frontal manifest:

- a row with an original report keeps it (``report_source=original``); the deterministic checker
  still runs and its flags are recorded, the text is never rewritten or sent anywhere;
- otherwise the configured backend writes one: ``template`` (deterministic, seeded by
  (seed, image_id)) or ``openai`` (any OpenAI-compatible endpoint). An LLM draft goes through
  the LLM QC pass (a second model call that returns a corrected report), then the checker;
  while the checker finds problems, up to ``qc.max_repair_rounds`` repair calls tell the QC
  model exactly what is wrong. Outcome: ``pass`` (clean without repair), ``repaired`` or
  ``fallback`` (the template report replaces a draft that could not be made clean or could
  not be obtained).

``qc_flags`` (JSON list) holds, in order: events (``llm_error:<call>:<kind>``), what repair
fixed (``repaired:<flag>``) or what made the row fall back (``rejected:<flag>``), then the
checker's flags on the final text. Privacy is enforced before any request
(:func:`check_policy`); answers are cached by content (:mod:`cxrfoundry.reports.cache`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from cxrfoundry.io import write_json, write_parquet
from cxrfoundry.net import is_loopback
from cxrfoundry.reports.cache import ResponseCache
from cxrfoundry.reports.checker import check_report, flag_kind
from cxrfoundry.reports.endpoint import managed_endpoint
from cxrfoundry.reports.llm import (
    OPENAI_DEFAULTS,
    LLMClient,
    LLMError,
    LLMSettings,
    LLMStats,
)
from cxrfoundry.reports.prompts import Prompts, load_prompts, problems_text, row_metadata
from cxrfoundry.reports.template import template_report
from cxrfoundry.schema import MANIFEST_SCHEMA, REPORTS_SCHEMA, conform

log = logging.getLogger(__name__)

POLICIES = ("public", "local_only", "none")
BACKENDS = ("template", "openai")
#: Defaults of the ``reports`` config block (``openai`` defaults: llm.OPENAI_DEFAULTS).
REPORTS_DEFAULTS: dict[str, Any] = {
    "backend": "template",
    "cache_dir": "resources/llm_cache",
    "prompts_dir": "config/prompts",
    "openai": OPENAI_DEFAULTS,
    "qc": {"enabled": True, "model": None, "base_url": None, "max_repair_rounds": 2},
}
_HEADINGS = re.compile(r"^\s*FINDINGS\s*:.*^\s*IMPRESSION\s*:", re.M | re.S | re.I)


class PrivacyError(ValueError):
    """A dataset's ``llm_policy`` forbids sending its metadata to the configured endpoint."""


def validate_report_text(text: str) -> str | None:
    """None when ``text`` looks like a report (FINDINGS then IMPRESSION headings), else why not."""
    if not text.strip():
        return "empty report"
    if not _HEADINGS.search(text):
        return "no FINDINGS/IMPRESSION sections"
    return None


def check_policy(policy: str, urls: list[str], allowed_hosts: list[str] | tuple[str, ...]) -> None:
    """Refuse (``PrivacyError``) endpoints the dataset policy does not allow; no network used.

    ``public``: any endpoint. ``local_only``: loopback hosts (127.0.0.0/8, ::1, localhost) or
    hosts listed in ``allowed_hosts``. ``none``: no endpoint at all.
    """
    if policy not in POLICIES:
        raise ValueError(f"llm_policy {policy!r} is not one of {', '.join(POLICIES)}")
    for url in urls:
        host = urlsplit(url).hostname or ""
        if policy == "none":
            raise PrivacyError(
                f"llm_policy 'none': this dataset's metadata may not be sent to {url}"
            )
        if policy == "local_only" and not is_loopback(url) and host not in set(allowed_hosts):
            raise PrivacyError(
                f"llm_policy 'local_only': refusing to send this dataset's metadata to {host!r} "
                f"({url}); use a loopback endpoint (or reports.openai.managed) or add the host "
                "to reports.openai.allowed_hosts if it is inside your site"
            )


def _merge(defaults: Mapping[str, Any], cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(defaults)
    for key, value in (cfg or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        elif value is not None or key not in out:
            out[key] = value
    return out


@dataclass
class _Outcome:
    report: str
    source: str
    status: str
    flags: list[str]
    llm_model: str | None = None
    prompt_sha256: str | None = None
    rounds: int = 0


@dataclass
class _Run:
    """Everything one LLM synthesis needs, shared by the row workers."""

    prompts: Prompts
    writer: LLMClient
    qc: LLMClient
    qc_enabled: bool
    max_rounds: int
    seed: int
    model_label: str
    stats: LLMStats = field(default_factory=LLMStats)


def _template_outcome(row: Mapping[str, Any], seed: int, events: list[str]) -> _Outcome:
    text = template_report(row, seed=seed)
    status = "fallback" if events else "pass"
    return _Outcome(text, "template", status, events + check_report(text, row))


async def _llm_row(row: Mapping[str, Any], run: _Run) -> _Outcome:
    meta = row_metadata(row)
    events: list[str] = []
    try:
        report = await run.writer.complete(run.prompts.writer(meta), validate_report_text)
    except LLMError as exc:
        return _template_outcome(row, run.seed, [f"llm_error:writer:{exc.kind}"])
    if run.qc_enabled:
        try:
            report = await run.qc.complete(run.prompts.qc(meta, report), validate_report_text)
        except LLMError as exc:
            events.append(f"llm_error:qc:{exc.kind}")  # keep the draft; the checker decides
    flags = check_report(report, row)
    first_flags = list(flags)
    rounds = 0
    while flags and run.qc_enabled and rounds < run.max_rounds:
        rounds += 1
        messages = run.prompts.qc(meta, report, problems_text(flags))
        try:
            report = await run.qc.complete(messages, validate_report_text)
        except LLMError as exc:
            events.append(f"llm_error:repair:{exc.kind}")
            break
        flags = check_report(report, row)
    if not flags:
        status = "repaired" if rounds else "pass"
        fixed = [f"repaired:{f}" for f in first_flags] if rounds else []
        return _Outcome(
            report, "llm", status, events + fixed, run.model_label, run.prompts.sha256, rounds
        )
    outcome = _template_outcome(row, run.seed, events + [f"rejected:{f}" for f in flags])
    outcome.rounds = rounds
    return outcome


async def _run_llm(rows: list[dict[str, Any]], todo: list[int], run: _Run) -> dict[int, _Outcome]:
    results: dict[int, _Outcome] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in todo:
        queue.put_nowait(index)
    progress = tqdm(total=len(todo), desc="LLM reports", unit="row", leave=False)

    async def worker() -> None:
        while True:
            try:
                index = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results[index] = await _llm_row(rows[index], run)
            progress.update(1)

    # Each worker runs one row's chain at a time; the clients' semaphores bound the requests.
    n_workers = max(run.writer.settings.concurrency, run.qc.settings.concurrency)
    try:
        async with run.writer, run.qc:
            await asyncio.gather(*(worker() for _ in range(min(n_workers, len(todo)) or 1)))
    finally:
        progress.close()
    return results


@contextlib.contextmanager
def _endpoint(settings: dict[str, Any], cache_dir: Path) -> Iterator[str | None]:
    managed = settings.get("managed")
    if not managed:
        yield None
        return
    with managed_endpoint(managed, model=settings["model"], log_dir=cache_dir) as url:
        yield url


def synthesize_reports(
    manifest: pa.Table, cfg: Mapping[str, Any], *, cache_dir: Path, dataset_policy: str, seed: int
) -> tuple[pa.Table, dict[str, Any]]:
    """Write, check and QC the report of every row; returns (reports table, audit dict).

    ``manifest`` must have the MANIFEST_SCHEMA columns (``ValueError`` names a missing one);
    the result has REPORTS_SCHEMA and the same rows in the same order. ``cfg`` is the
    ``reports`` config block (keys and defaults: :data:`REPORTS_DEFAULTS`). Raises
    :class:`PrivacyError` before any request when ``dataset_policy`` forbids the endpoint.
    """
    settings = _merge(REPORTS_DEFAULTS, cfg)
    backend = settings["backend"]
    if backend not in BACKENDS:
        raise ValueError(f"reports.backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if dataset_policy not in POLICIES:
        raise ValueError(f"llm_policy {dataset_policy!r} is not one of {', '.join(POLICIES)}")
    table = conform(manifest, MANIFEST_SCHEMA)
    rows = table.to_pylist()
    todo = [i for i, row in enumerate(rows) if not (row["report"] or "").strip()]
    effective = backend
    if backend == "openai" and dataset_policy == "none":
        log.warning("llm_policy 'none': writing template reports instead of calling an LLM")
        effective = "template"
    if effective == "openai" and not todo:
        effective = "template"  # nothing to write: never start a server or open a connection

    outcomes: dict[int, _Outcome] = {}
    stats = LLMStats()
    prompts: Prompts | None = None
    model_label = None
    if effective == "openai":
        oa = dict(settings["openai"])
        qc_cfg = dict(settings["qc"])
        managed = bool(oa.get("managed"))
        if not managed:
            urls = [oa["base_url"]] + ([qc_cfg["base_url"]] if qc_cfg.get("base_url") else [])
            check_policy(dataset_policy, urls, oa.get("allowed_hosts") or [])
        elif qc_cfg.get("base_url"):
            check_policy(dataset_policy, [qc_cfg["base_url"]], oa.get("allowed_hosts") or [])
        prompts = load_prompts(settings["prompts_dir"])
        cache = ResponseCache(cache_dir)
        with _endpoint(oa, Path(cache_dir)) as managed_url:
            if managed_url:
                oa["base_url"] = managed_url
            writer_settings = LLMSettings.from_config(oa)
            qc_settings = LLMSettings.from_config(
                {
                    **oa,
                    "model": qc_cfg.get("model") or oa["model"],
                    "base_url": qc_cfg.get("base_url") or oa["base_url"],
                }
            )
            model_label = writer_settings.model
            if qc_settings.model != writer_settings.model:
                model_label += f";qc={qc_settings.model}"
            writer = LLMClient(
                writer_settings, prompt_sha256=prompts.sha256, cache=cache, stats=stats
            )
            qc = writer
            if (qc_settings.model, qc_settings.base_url) != (writer_settings.model, oa["base_url"]):
                qc = LLMClient(qc_settings, prompt_sha256=prompts.sha256, cache=cache, stats=stats)
            run = _Run(
                prompts,
                writer,
                qc,
                bool(qc_cfg.get("enabled", True)),
                int(qc_cfg.get("max_repair_rounds", 2)),
                seed,
                model_label,
                stats,
            )
            log.info("writing %d reports with %s at %s", len(todo), model_label, oa["base_url"])
            outcomes = asyncio.run(_run_llm(rows, todo, run))

    out_rows = []
    for i, row in enumerate(tqdm(rows, desc="reports", unit="row", leave=False)):
        original = row["report"] if (row["report"] or "").strip() else None
        if original is not None:
            outcome = _Outcome(original, "original", "pass", check_report(original, row))
        elif i in outcomes:
            outcome = outcomes[i]
        else:
            outcome = _template_outcome(row, seed, [])
        out_rows.append(
            {
                **row,
                "report": outcome.report,
                "report_original": original,
                "report_source": outcome.source,
                "qc_status": outcome.status,
                "qc_flags": json.dumps(outcome.flags),
                "llm_model": outcome.llm_model,
                "prompt_sha256": outcome.prompt_sha256,
                "_rounds": outcome.rounds,
            }
        )
    result = conform(out_rows, REPORTS_SCHEMA) if out_rows else REPORTS_SCHEMA.empty_table()
    audit = _audit(out_rows, len(rows), effective, dataset_policy, model_label, prompts, stats)
    if audit["rows_in"] != audit["rows_out"]:  # pragma: no cover - guarded by construction
        raise AssertionError(f"rows_in {audit['rows_in']} != rows_out {audit['rows_out']}")
    return result, audit


def _audit(
    out_rows: list[dict[str, Any]],
    rows_in: int,
    backend: str,
    policy: str,
    model: str | None,
    prompts: Prompts | None,
    stats: LLMStats,
) -> dict[str, Any]:
    sources = Counter(r["report_source"] for r in out_rows)
    statuses = Counter(r["qc_status"] for r in out_rows)
    flags: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for r in out_rows:
        for flag in json.loads(r["qc_flags"]):
            flags[flag] += 1
            kinds[flag_kind(flag)] += 1
    generated = [r for r in out_rows if r["report_source"] != "original"]
    rounds = Counter(str(r["_rounds"]) for r in generated)
    return {
        "rows_in": rows_in,
        "rows_out": len(out_rows),
        "backend": backend,
        "dataset_policy": policy,
        "llm_model": model,
        "prompt_sha256": prompts.sha256 if prompts else None,
        "report_source": {s: sources.get(s, 0) for s in ("original", "llm", "template")},
        "qc_status": {s: statuses.get(s, 0) for s in ("pass", "repaired", "fallback")},
        "qc_pass_rate": (
            sum(r["qc_status"] == "pass" for r in generated) / len(generated) if generated else None
        ),
        "rows_flagged": sum(1 for r in out_rows if json.loads(r["qc_flags"])),
        "flags": dict(sorted(flags.items())),
        "flag_kinds": dict(sorted(kinds.items())),
        "repairs": {
            "rows_repaired": statuses.get("repaired", 0),
            "rounds_total": sum(r["_rounds"] for r in generated),
            "rounds_histogram": dict(sorted(rounds.items())),
        },
        "requests": stats.as_dict(),
    }


def audit_metrics(audit: Mapping[str, Any]) -> dict[str, float]:
    """The numeric part of an audit, flattened to dotted keys (for MLflow ``log_metrics``)."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        elif isinstance(value, int | float):  # bool is an int
            out[prefix] = float(value)

    walk("", audit)
    return out


def write_reports(
    table: pa.Table, audit: Mapping[str, Any], *, reports_path: Path, audit_path: Path
) -> None:
    """Write the reports Parquet and the audit JSON, each atomically and deterministically."""
    write_parquet(reports_path, table)
    write_json(audit_path, dict(audit))


def synthesize_reports_files(
    frontal_path: Path,
    settings: Mapping[str, Any],
    *,
    reports_path: Path,
    audit_path: Path,
    cache_dir: Path,
    dataset_policy: str,
    seed: int,
) -> dict[str, float]:
    """File-level entry point for the Snakemake rule: read, synthesize, write.

    Returns :func:`audit_metrics` of the audit (numbers only, ready for MLflow); the full
    audit is written to ``audit_path``. Errors reading the input name the file.
    """
    try:
        manifest = pq.read_table(frontal_path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"{frontal_path}: cannot read the frontal manifest ({exc})") from exc
    try:
        table, audit = synthesize_reports(
            manifest, settings, cache_dir=cache_dir, dataset_policy=dataset_policy, seed=seed
        )
    except ValueError as exc:
        if isinstance(exc, PrivacyError):
            raise
        raise ValueError(f"{frontal_path}: {exc}") from exc
    write_reports(table, audit, reports_path=reports_path, audit_path=audit_path)
    log.info(
        "%s: %d rows; sources %s; qc %s; requests sent %d, cache hits %d",
        reports_path,
        audit["rows_out"],
        audit["report_source"],
        audit["qc_status"],
        audit["requests"]["requests_sent"],
        audit["requests"]["cache_hits"],
    )
    return audit_metrics(audit)
