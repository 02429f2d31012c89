"""Reproducibility audit: verify outputs and lineage against provenance records, list what is
stale, and rebuild a target from its recorded inputs to compare.

Every successful job writes ``results/provenance/{rule}/{key}.json`` (see
:mod:`cxrfoundry.pipeline`) with the sha256 of its inputs and outputs, its params, and the hash
of the library code it ran. The audit reads those records, all paths relative to the workflow's
working directory, and checks three things:

1. **Integrity and lineage.** Every recorded output still has its recorded hash; every input of
   every record was, byte for byte, the output of another record (or a raw file listed with its
   sha256 in ``resources/raw/{dataset}.manifest.json``), so the chain from raw files to the
   benchmark table is unbroken. A flipped byte, a swapped input or a missing record is an error
   naming the file.
2. **Staleness.** A record whose code hash differs from the current
   :func:`cxrfoundry.provenance.code_hash` of its modules, or whose params differ from the params
   Snakemake would now give the same job (``current_params``; read from the workflow by
   :func:`snakemake_current_params`), is stale: rerunning the workflow would rebuild it. Stale
   is reported, not failed.
3. **Reproduction** (:func:`reproduce`): copy a target's recorded inputs into a scratch folder,
   run ``snakemake TARGET`` there with the same config and compare the new output with the
   record, bitwise for deterministic stages, within tolerances for training outputs.

Reports are written as JSON and Markdown (:func:`write_report`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cxrfoundry.io import (
    dumps_json,
    read_json,
    sha256_file,
    sha256_tree,
    tree_files,
    write_json,
    write_text,
)

log = logging.getLogger(__name__)

PROVENANCE_DIR = "results/provenance"
RAW_MANIFESTS = "resources/raw/*.manifest.json"
#: Params that are compared through their own finding kind, not as params.
CODE_PARAM = "code"

#: Rules whose outputs are compared within tolerances by :func:`reproduce` (GPU/float
#: non-determinism across devices); everything else must reproduce bitwise.
DEFAULT_TOLERANCES: dict[str, dict[str, float]] = {
    "pretrain_*": {"rtol": 1e-4, "atol": 1e-5},
    "train_*": {"rtol": 1e-4, "atol": 1e-5},
    "finetune_*": {"rtol": 1e-4, "atol": 1e-5},
    "encode_features": {"rtol": 1e-4, "atol": 1e-5},
    "zeroshot": {"rtol": 1e-4, "atol": 1e-5},
    "retrieval": {"rtol": 1e-4, "atol": 1e-5},
    "probe": {"rtol": 1e-4, "atol": 1e-5},
    "segment": {"rtol": 1e-4, "atol": 1e-5},
    "fairness": {"rtol": 1e-4, "atol": 1e-5},
    "augment": {"rtol": 1e-4, "atol": 1e-5},
    "synth_pretrain": {"rtol": 1e-4, "atol": 1e-5},
    "synthesize_cohort": {"rtol": 1e-3, "atol": 1e-3},
    "generation_quality": {"rtol": 1e-3, "atol": 1e-3},
}

#: Keys of JSON outputs and checkpoints that measure the run rather than its result (wall
#: time, throughput, utilisation): :func:`compare_within_tolerance` does not compare them.
TIMING_KEYS: tuple[str, ...] = ("*_per_s", "wall_s*", "*_wall_s", "mfu", "elapsed*", "*_seconds")

ERROR, STALE, WARNING = "error", "stale", "warning"


@dataclass
class Finding:
    """One problem the audit found."""

    kind: str
    severity: str
    message: str
    path: str | None = None
    record: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class AuditReport:
    """Everything an audit found, with counts of what it looked at."""

    workdir: str
    records: int = 0
    outputs_checked: int = 0
    inputs_checked: int = 0
    raw_files_checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    reproductions: list[dict[str, Any]] = field(default_factory=list)
    #: Job wall time per pipeline stage, from the records (:func:`run_times`).
    run_time: list[dict[str, Any]] = field(default_factory=list)
    #: Stale records fail the audit too (results must match the current code and config).
    strict: bool = False
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def errors(self) -> list[Finding]:
        """Findings that fail the audit."""
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def stale(self) -> list[Finding]:
        """Records the current code/config/params would rebuild."""
        return [f for f in self.findings if f.severity == STALE]

    @property
    def ok(self) -> bool:
        """True when nothing failed (stale records fail only a ``strict`` audit)."""
        if self.strict and self.stale:
            return False
        return not self.errors and all(r.get("ok") for r in self.reproductions)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form of the report."""
        return {
            "ok": self.ok,
            "strict": self.strict,
            "workdir": self.workdir,
            "created": self.created,
            "counts": {
                "records": self.records,
                "outputs_checked": self.outputs_checked,
                "inputs_checked": self.inputs_checked,
                "raw_files_checked": self.raw_files_checked,
                "errors": len(self.errors),
                "stale": len(self.stale),
                "warnings": len([f for f in self.findings if f.severity == WARNING]),
            },
            "findings": [asdict(f) for f in self.findings],
            "reproductions": self.reproductions,
            "run_time": self.run_time,
        }

    def to_markdown(self) -> str:
        """A readable report."""
        d = self.to_dict()
        c = d["counts"]
        lines = [
            "# Reproducibility audit",
            "",
            f"**Result: {'PASS' if self.ok else 'FAIL'}** — {self.created}, `{self.workdir}`",
            "",
            f"- provenance records: {c['records']}",
            f"- outputs verified against their sha256: {c['outputs_checked']}",
            f"- inputs traced to the record that produced them: {c['inputs_checked']}",
            f"- raw files verified against dataset manifests: {c['raw_files_checked']}",
            f"- errors: {c['errors']}, stale: {c['stale']}, warnings: {c['warnings']}",
            "",
        ]
        for title, severity in (
            ("Errors", ERROR),
            ("Stale (rerun would rebuild)", STALE),
            ("Warnings", WARNING),
        ):
            items = [f for f in self.findings if f.severity == severity]
            if not items:
                continue
            lines += [f"## {title}", "", "| kind | file | record | what |", "|---|---|---|---|"]
            for f in items:
                msg = f.message.replace("|", "\\|")
                lines.append(f"| {f.kind} | `{f.path or ''}` | `{f.record or ''}` | {msg} |")
            lines.append("")
        if self.reproductions:
            lines += ["## Reproductions", ""]
            for r in self.reproductions:
                lines.append(f"### `{r['target']}` ({r['rule']}): {'OK' if r['ok'] else 'DIFFERS'}")
                lines.append("")
                for cmp in r["comparisons"]:
                    lines.append(f"- `{cmp['path']}`: {cmp['result']} — {cmp['detail']}")
                lines.append("")
        if not self.findings:
            lines += ["No problems found: every output matches its record and every input is",
                      "traced to the record that produced it.", ""]  # fmt: skip
        if self.run_time:
            lines += run_time_markdown(self.run_time)
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ digests
def current_digest(path: Path, like: str | None = None) -> str | None:
    """Digest of ``path`` now, in the scheme of the recorded digest ``like``.

    Records hash files with sha256, folders with :func:`cxrfoundry.io.sha256_tree`, and a raw
    dataset folder
    as ``manifest:<sha256 of its manifest>`` (its files are then checked against the manifest).
    None if the path does not exist.
    """
    if like and like.startswith("manifest:"):
        manifest = path.with_name(path.name + ".manifest.json")
        return "manifest:" + sha256_file(manifest) if manifest.is_file() else None
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return sha256_tree(path)
    return None


def load_records(workdir: Path, provenance_dir: str = PROVENANCE_DIR) -> dict[str, dict[str, Any]]:
    """All provenance records under ``workdir/provenance_dir``, keyed by their relative path."""
    root = workdir / provenance_dir
    records = {}
    for path in sorted(root.rglob("*.json")) if root.is_dir() else []:
        rel = path.relative_to(workdir).as_posix()
        record = read_json(path)
        missing = {"rule", "inputs", "outputs"} - set(record)
        if missing:
            raise ValueError(f"{rel}: provenance record lacks {sorted(missing)}")
        records[rel] = record
    return records


def _producers(records: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, str], list[Finding]]:
    """Map each output path to the record that produced it; two producers is an error."""
    producer: dict[str, str] = {}
    findings = []
    for name, record in records.items():
        for out in record["outputs"]:
            if out in producer:
                findings.append(
                    Finding(
                        "duplicate_producer",
                        ERROR,
                        f"produced by two records ({producer[out]} and {name})",
                        path=out,
                        record=name,
                    )
                )
            producer[out] = name
    return producer, findings


def _manifest_files(manifest: Path) -> dict[str, str]:
    data = read_json(manifest)
    files = data.get("files", data) if isinstance(data, dict) else data
    if isinstance(files, Mapping):
        return {str(k): str(v) for k, v in files.items()}
    try:
        return {str(f["path"]): str(f["sha256"]) for f in files}
    except (TypeError, KeyError) as exc:
        raise ValueError(f"{manifest}: expected files with 'path' and 'sha256' ({exc})") from exc


def verify_raw(workdir: Path, findings: list[Finding]) -> int:
    """Check every raw file against its dataset manifest; return how many were checked."""
    checked = 0
    manifests = sorted(workdir.glob(RAW_MANIFESTS))
    for manifest in manifests:
        rel_manifest = manifest.relative_to(workdir).as_posix()
        root = manifest.with_name(manifest.name[: -len(".manifest.json")])
        try:
            files = _manifest_files(manifest)
        except ValueError as exc:
            findings.append(Finding("raw_manifest_invalid", ERROR, str(exc), path=rel_manifest))
            continue
        for rel, sha in tqdm(sorted(files.items()), desc=f"raw {root.name}", leave=False):
            path = root / rel
            rel_path = path.relative_to(workdir).as_posix()
            checked += 1
            if not path.is_file():
                findings.append(
                    Finding("raw_missing", ERROR, f"listed in {rel_manifest} but missing", rel_path)
                )
            elif sha256_file(path) != sha:
                findings.append(
                    Finding(
                        "raw_modified",
                        ERROR,
                        f"sha256 differs from {rel_manifest} (raw file changed)",
                        rel_path,
                    )
                )
    return checked


def _is_raw(path: str) -> bool:
    return path.startswith("resources/raw/")


def verify_chain(
    workdir: Path,
    records: Mapping[str, Mapping[str, Any]],
    report: AuditReport,
    *,
    external_ok: Callable[[str], bool] | None = None,
) -> None:
    """Check outputs against their records and every input against the record that made it."""
    producer, findings = _producers(records)
    report.findings += findings
    digest_cache: dict[tuple[str, str | None], str | None] = {}

    def now(path: str, like: str | None) -> str | None:
        key = (path, "manifest" if like and like.startswith("manifest:") else None)
        if key not in digest_cache:
            digest_cache[key] = current_digest(workdir / path, like)
        return digest_cache[key]

    is_external = external_ok or (lambda p: not (p.startswith("results/") or _is_raw(p)))
    for name, record in tqdm(records.items(), desc="audit records", leave=False):
        for out, sha in record["outputs"].items():
            report.outputs_checked += 1
            current = now(out, sha)
            if current is None:
                report.findings.append(
                    Finding("output_missing", ERROR, "recorded output is missing", out, name)
                )
            elif current != sha:
                report.findings.append(
                    Finding(
                        "output_modified",
                        ERROR,
                        "content differs from its provenance record (sha256 mismatch)",
                        out,
                        name,
                        {"recorded": sha, "current": current},
                    )
                )
        for inp, sha in record["inputs"].items():
            report.inputs_checked += 1
            source = producer.get(inp)
            if source is not None:
                made = records[source]["outputs"][inp]
                if made != sha:
                    report.findings.append(
                        Finding(
                            "input_mismatch",
                            ERROR,
                            f"input used by this job differs from what {source} produced "
                            "(swapped or rebuilt after use)",
                            inp,
                            name,
                            {"used": sha, "produced": made},
                        )
                    )
                    continue
            elif not is_external(inp):
                report.findings.append(
                    Finding(
                        "broken_chain",
                        ERROR,
                        "input has no provenance record that produced it",
                        inp,
                        name,
                    )
                )
            current = now(inp, sha)
            if current != sha and source is None:
                # Inputs with a producer are reported once, as that producer's output.
                report.findings.append(
                    Finding(
                        "input_modified" if current is not None else "input_missing",
                        ERROR,
                        "input differs from the one this job used"
                        if current is not None
                        else "input this job used is missing",
                        inp,
                        name,
                        {"recorded": sha, "current": current},
                    )
                )


# -------------------------------------------------------------------------------- staleness
def _normalise(params: Mapping[str, Any]) -> dict[str, Any]:
    from cxrfoundry.provenance import redact

    loggable = {k: v for k, v in params.items() if not str(k).startswith("_")}
    return json.loads(dumps_json(redact(loggable)))


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if old != new else []


def job_identity(wildcards: Mapping[str, Any]) -> str:
    """A job's identity within its rule, independent of wildcard order.

    Records store their wildcards as JSON with sorted keys while Snakemake lists them in the
    output pattern's order, so both sides are compared as ``name=value`` pairs sorted by name.
    """
    return "&".join(f"{k}={wildcards[k]}" for k in sorted(wildcards)) or "all"


def find_stale(
    records: Mapping[str, Mapping[str, Any]],
    report: AuditReport,
    *,
    current_params: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
    code_hash: Callable[..., str] | None = None,
) -> None:
    """Flag records whose code or params differ from what the workflow would use now.

    ``current_params`` maps ``(rule, job_identity)`` to the params the current workflow gives that
    job; records of jobs the workflow no longer has are reported as warnings.
    """
    if code_hash is None:
        from cxrfoundry.provenance import code_hash
    for name, record in records.items():
        params = record.get("params") or {}
        code = params.get(CODE_PARAM) if isinstance(params.get(CODE_PARAM), dict) else None
        modules = (code or {}).get("modules") or record.get("code_modules") or []
        recorded_code = record.get("code_sha256") or (code or {}).get("sha256")
        if modules and recorded_code:
            try:
                now = code_hash(*modules)
            except (FileNotFoundError, ValueError) as exc:
                report.findings.append(
                    Finding("stale_code", STALE, f"module gone: {exc}", record=name)
                )
            else:
                if now != recorded_code:
                    report.findings.append(
                        Finding(
                            "stale_code",
                            STALE,
                            "library code changed since this job ran "
                            f"(modules {', '.join(modules)})",
                            record=name,
                            details={
                                "modules": list(modules),
                                "recorded": recorded_code,
                                "current": now,
                            },
                        )
                    )
        if current_params is None:
            continue
        key = (record["rule"], job_identity(record.get("wildcards") or {}))
        if key not in current_params:
            report.findings.append(
                Finding(
                    "not_in_workflow",
                    WARNING,
                    "the current workflow has no such job (removed from config?)",
                    record=name,
                )
            )
            continue
        old = {k: v for k, v in _normalise(params).items() if k != CODE_PARAM}
        new = {k: v for k, v in _normalise(current_params[key]).items() if k != CODE_PARAM}
        changed = _diff(old, new)
        if changed:
            report.findings.append(
                Finding(
                    "stale_params",
                    STALE,
                    f"params changed: {', '.join(changed)}",
                    record=name,
                    details={
                        "params": changed,
                        "recorded": {p: _lookup(old, p) for p in changed},
                        "current": {p: _lookup(new, p) for p in changed},
                    },
                )
            )


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


_DUMP_PARAMS = r"""
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings,
    ResourceSettings, StorageSettings, Quietness)
snakefile, workdir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
targets = json.loads(sys.argv[4])
configfiles = [Path(p) for p in sys.argv[5:]]
with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
    wf = api.workflow(resource_settings=ResourceSettings(),
                      config_settings=ConfigSettings(configfiles=configfiles),
                      storage_settings=StorageSettings(), snakefile=snakefile, workdir=workdir)
    dag = wf.dag(DAGSettings(targets=set(targets)) if targets else DAGSettings())
    w = dag.workflow_api._workflow
    w._prepare_dag(forceall=False, ignore_incomplete=True, lock_warn_only=True, nolock=True)
    w._build_dag()
    jobs = []
    for job in w.dag.jobs:
        jobs.append({"rule": job.rule.name, "wildcards": dict(job.wildcards_dict),
                     "params": dict(job.params.items())})
out.write_text(json.dumps(jobs, default=str))
"""


def snakemake_current_params(
    workdir: Path,
    snakefile: Path | None = None,
    configfiles: Sequence[Path] = (),
    targets: Sequence[str] = (),
) -> dict[tuple[str, str], dict[str, Any]]:
    """The params the workflow in ``workdir`` gives each job now, from Snakemake's own DAG.

    Runs Snakemake's Python API in a subprocess (its global state and logging stay out of the
    caller), builds the DAG of ``targets`` (default: the workflow's default target) without
    executing anything, and returns ``{(rule, job_identity): params}``.
    """
    workdir = Path(workdir).resolve()
    snakefile = Path(snakefile or workdir / "Snakefile").resolve()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "jobs.json"
        cmd = [sys.executable, "-c", _DUMP_PARAMS, str(snakefile), str(workdir), str(out)]
        cmd.append(json.dumps(sorted(targets)))
        cmd += [str(Path(c).resolve()) for c in configfiles]
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"could not read the current workflow's jobs from {snakefile}: "
                f"{proc.stderr.strip()[-3000:]}"
            )
        jobs = json.loads(out.read_text())
    return {(j["rule"], job_identity(j["wildcards"])): j["params"] for j in jobs}


# --------------------------------------------------------------------------------- the audit
def audit(
    workdir: str | os.PathLike[str] = ".",
    *,
    check_raw: bool = True,
    stale: bool = True,
    check_params: bool = True,
    current_params: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
    snakefile: Path | None = None,
    configfiles: Sequence[Path] = (),
    target: str | None = None,
    strict: bool = False,
    skip_rules: Collection[str] = (),
    stages: Mapping[str, str] | None = None,
) -> AuditReport:
    """Audit the provenance records of the workflow run in ``workdir``.

    ``current_params``: the params each job would get now; by default read from the workflow with
    :func:`snakemake_current_params` when ``workdir`` has a Snakefile (stale check of params),
    else params are not compared. ``check_params=False`` skips planning the workflow (the
    ``audit`` rule runs inside Snakemake, which already reruns jobs whose params changed); code
    hashes are still compared. ``target``: also require that this output has a record and
    audit only its ancestry. ``strict``: stale records fail the audit (a changed param or
    module means the results are not what the current workflow would produce). ``skip_rules``:
    leave out the records of these rules (the ``audit`` rule's previous record while it reruns).
    ``stages``: rule -> pipeline stage, for the run-time table (:func:`run_times`); by default
    the map the workflow's ``audit`` rule recorded (:func:`recorded_stages`).
    """
    root = Path(workdir).resolve()
    report = AuditReport(workdir=str(root), strict=strict)
    records = load_records(root)
    if skip_rules:
        records = {k: r for k, r in records.items() if r["rule"] not in skip_rules}
    if target is not None:
        records = ancestry(records, target)
        if not records:
            report.findings.append(
                Finding("no_record", ERROR, "no provenance record produced this target", target)
            )
    report.records = len(records)
    report.run_time = run_times(records, recorded_stages(records) if stages is None else stages)
    if not records and target is None:
        report.findings.append(
            Finding("no_records", ERROR, f"no provenance records under {PROVENANCE_DIR}")
        )
    verify_chain(root, records, report)
    if check_raw:
        report.raw_files_checked = verify_raw(root, report.findings)
    if stale:
        wants_plan = check_params and (snakefile or (root / "Snakefile").is_file())
        if current_params is None and wants_plan:
            # Plan exactly the recorded jobs: their outputs are the DAG's targets.
            targets = sorted({o for r in records.values() for o in r["outputs"]})
            try:
                current_params = snakemake_current_params(root, snakefile, configfiles, targets)
            except RuntimeError as exc:
                report.findings.append(Finding("workflow_unreadable", WARNING, str(exc)))
        elif current_params is None and check_params:
            # Without a workflow to plan, a changed param would go unnoticed: say so.
            report.findings.append(
                Finding(
                    "params_not_compared",
                    WARNING,
                    f"no Snakefile in {root} and none given: params were not compared with "
                    "the current config (pass snakefile=/configfiles=)",
                )
            )
        find_stale(records, report, current_params=current_params)
    return report


def ancestry(records: Mapping[str, Mapping[str, Any]], target: str) -> dict[str, dict[str, Any]]:
    """The records that produced ``target`` and, transitively, its inputs."""
    producer, _ = _producers(records)
    target = target.rstrip("/")
    start = producer.get(target) or next(
        (producer[o] for o in producer if target.startswith(o.rstrip("/") + "/")), None
    )
    if start is None:
        return {}
    keep: dict[str, dict[str, Any]] = {}
    stack = [start]
    while stack:
        name = stack.pop()
        if name in keep:
            continue
        keep[name] = dict(records[name])
        stack.extend(producer[i] for i in records[name]["inputs"] if i in producer)
    return keep


def audit_to_files(
    workdir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    rule: str = "audit",
    stages: Mapping[str, str] | None = None,
) -> dict:
    """The ``audit`` rule: audit the run in ``workdir`` and write its report; fail if not ok.

    The rule's own record from an earlier run is left out: this job is replacing it (Snakemake
    already deleted its outputs), and its inputs are being rebuilt by this very run.
    """
    report = audit(workdir, check_params=False, skip_rules=(rule,), stages=stages)
    json_path, _ = write_report(report, out_dir)
    if not report.ok:
        raise RuntimeError(f"reproducibility audit failed, see {json_path}")
    return {"records": report.records, "stale": len(report.stale), "errors": len(report.errors)}


def write_report(report: AuditReport, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``audit.json`` and ``audit.md`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    json_path, md_path = out / "audit.json", out / "audit.md"
    write_json(json_path, report.to_dict())
    write_text(md_path, report.to_markdown())
    return json_path, md_path


# ------------------------------------------------------------------------------- run time
def recorded_stages(records: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Rule -> stage as the workflow's ``audit`` rule recorded it (its ``stages`` param), so an
    audit outside Snakemake (the CLI) groups run times by stage too; ``{}`` without one."""
    for record in records.values():
        stages = (record.get("params") or {}).get("stages")
        if record.get("rule") == "audit" and isinstance(stages, Mapping):
            return {str(rule): str(stage) for rule, stage in stages.items()}
    return {}


def run_times(
    records: Mapping[str, Mapping[str, Any]], stages: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Job wall time per pipeline stage, from the records' ``started``/``ended`` stamps.

    One row per stage (``stages`` maps rule -> stage; other rules are their own stage), in
    order of first start: jobs, the sum of their wall times (``job_s``), and the ``span_s``
    from the first job's start to the last one's end. Jobs of one stage may overlap (two
    cores) or be apart (rerun another day), so the span is wall-clock time only for records of
    one run. A last row, ``all``, covers every record. Records without stamps are left out.
    """
    spans: dict[str, list[tuple[datetime, datetime]]] = {}
    for record in records.values():
        try:
            start = datetime.fromisoformat(record["started"])
            end = datetime.fromisoformat(record["ended"])
        except (KeyError, TypeError, ValueError):
            continue
        stage = stages.get(record["rule"], record["rule"])
        spans.setdefault(stage, []).append((start, end))
    every = [s for jobs in spans.values() for s in jobs]
    if every:
        spans["all"] = every
    rows = []
    for stage, jobs in spans.items():
        first, last = min(s for s, _ in jobs), max(e for _, e in jobs)
        rows.append(
            {
                "stage": stage,
                "jobs": len(jobs),
                "job_s": round(sum((e - s).total_seconds() for s, e in jobs), 1),
                "first_start": first.isoformat(timespec="seconds"),
                "last_end": last.isoformat(timespec="seconds"),
                "span_s": round((last - first).total_seconds(), 1),
            }
        )
    rows.sort(key=lambda r: (r["stage"] == "all", r["first_start"]))
    return rows


def run_time_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The run-time table of :func:`run_times` as Markdown lines."""
    lines = [
        "## Run time",
        "",
        "Job wall time per stage (Snakemake job start to end, from the provenance records;",
        "span = first start to last end, wall-clock time when the records are from one run).",
        "",
        "| stage | jobs | job time | span | first start |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['jobs']} | {_minutes(r['job_s'])} | {_minutes(r['span_s'])} "
            f"| {r['first_start']} |"
        )
    return [*lines, ""]


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


# ------------------------------------------------------------------------------- reproduce
#: Files and folders copied into the scratch folder so Snakemake can plan there.
WORKFLOW_FILES = ("Snakefile", "rules", "workflow", "config", "profiles", "envs", "report")


def workflow_root(workdir: Path, workflow_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the Snakefile lives: ``workflow_dir``, else ``workdir`` if it has one, else the
    checkout that holds this package (runs made with ``snakemake --directory``)."""
    if workflow_dir is not None:
        return Path(workflow_dir).resolve()
    if (workdir / "Snakefile").is_file():
        return workdir
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "Snakefile").is_file():
        return checkout
    raise FileNotFoundError(f"no Snakefile in {workdir}; pass workflow_dir")


def _tolerance(rule: str, tolerances: Mapping[str, Mapping[str, float]]) -> dict[str, float] | None:
    for pattern, tol in tolerances.items():
        if fnmatch.fnmatchcase(rule, pattern):
            return dict(tol)
    return None


def _is_timing(key: Any) -> bool:
    return isinstance(key, str) and any(fnmatch.fnmatchcase(key, p) for p in TIMING_KEYS)


def _close(a: Any, b: Any, rtol: float, atol: float) -> bool:
    """Numbers within tolerance, tensors and arrays element-wise, containers recursively;
    timing keys (:data:`TIMING_KEYS`) skipped; anything else by equality."""
    import numpy as np
    import torch

    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys_a = {k for k in a if not _is_timing(k)}
        keys_b = {k for k in b if not _is_timing(k)}
        return keys_a == keys_b and all(_close(a[k], b[k], rtol, atol) for k in keys_a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not (a.is_floating_point() or a.is_complex()):
            return bool(torch.equal(a, b))
        return bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return _close(torch.from_numpy(a), torch.from_numpy(b), rtol, atol)
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
    return a == b


def _load_numeric(path: Path) -> Any | None:
    """A file's content as comparable Python/torch objects, or None for an opaque format."""
    name = path.name
    if name.endswith(".json"):
        return read_json(path)
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    if name.endswith((".pt", ".pth")):
        import torch

        # Our own training states: tensors, numbers, RNG states (a trusted, local file).
        return torch.load(path, map_location="cpu", weights_only=False)
    return None


def compare_within_tolerance(old: Path, new: Path, rtol: float, atol: float) -> tuple[bool, str]:
    """Compare two files or folders numerically: JSON number-wise, safetensors and torch
    checkpoints tensor-wise (timing fields, :data:`TIMING_KEYS`, left out), other files
    bitwise. Returns (ok, explanation)."""
    pairs: list[tuple[Path, Path, str]]
    if old.is_dir():
        names = sorted(
            {p.relative_to(old).as_posix() for p in tree_files(old)}
            | {p.relative_to(new).as_posix() for p in tree_files(new)}
        )
        pairs = [(old / n, new / n, n) for n in names]
    else:
        pairs = [(old, new, old.name)]
    for a, b, name in pairs:
        if not a.is_file() or not b.is_file():
            return False, f"{name} exists in only one of the two"
        if sha256_file(a) == sha256_file(b):
            continue
        content_a = _load_numeric(a)
        if content_a is None:
            return False, f"{name}: bytes differ (no numeric comparison for this file type)"
        if not _close(content_a, _load_numeric(b), rtol, atol):
            return False, f"{name}: values differ beyond rtol={rtol}, atol={atol}"
    return True, f"equal within rtol={rtol}, atol={atol} (timing fields not compared)"


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=False, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)


def reproduce(
    target: str,
    workdir: str | os.PathLike[str] = ".",
    *,
    scratch: str | os.PathLike[str] | None = None,
    configfiles: Sequence[str] = (),
    cores: int = 1,
    tolerances: Mapping[str, Mapping[str, float]] = DEFAULT_TOLERANCES,
    snakemake_args: Sequence[str] = (),
    keep_scratch: bool = False,
    workflow_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Rebuild ``target`` from its recorded inputs in a scratch folder and compare with the record.

    The job's recorded inputs (verified against their sha256 first), the workflow files and the
    config files are copied to ``scratch``; ``snakemake TARGET --allowed-rules RULE`` runs there,
    so only the target's own job is re-executed. Outputs of rules matching ``tolerances`` are
    compared numerically, all others bitwise. Returns a dict with ``ok`` and per-output
    ``comparisons`` (also added to reports by the CLI).
    """
    root = Path(workdir).resolve()
    records = load_records(root)
    chain = ancestry(records, target)
    producer, _ = _producers(records)
    start = producer.get(target.rstrip("/")) or next(
        (producer[o] for o in producer if target.startswith(o.rstrip("/") + "/")), None
    )
    if start is None or not chain:
        raise LookupError(f"{target}: no provenance record produced it (run the workflow first)")
    record = records[start]
    scratch_dir = Path(scratch or tempfile.mkdtemp(prefix="cxrf-reproduce-")).resolve()
    scratch_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "target": target,
        "rule": record["rule"],
        "record": start,
        "scratch": str(scratch_dir),
        "comparisons": [],
    }
    try:
        source = workflow_root(root, workflow_dir)
        for name in WORKFLOW_FILES:
            if (source / name).exists():
                _copy(source / name, scratch_dir / name)
        for cfg in configfiles:
            cfg_path = Path(cfg)
            if not cfg_path.is_absolute() and (root / cfg_path).exists():
                _copy(root / cfg_path, scratch_dir / cfg_path)
        for inp, sha in record["inputs"].items():
            src = root / inp
            now = current_digest(src, sha)
            if now != sha:
                raise ValueError(
                    f"{inp}: recorded input of {start} has changed or is missing "
                    f"(recorded {sha}, now {now}); audit the chain first"
                )
            _copy(src, scratch_dir / inp)
            if sha.startswith("manifest:"):
                manifest = src.with_name(src.name + ".manifest.json")
                _copy(manifest, scratch_dir / manifest.relative_to(root))
        cmd = [sys.executable, "-m", "snakemake", *record["outputs"].keys()]
        cmd += ["--cores", str(cores), "--allowed-rules", record["rule"]]
        for cfg in configfiles:
            cmd += ["--configfile", str(cfg)]
        cmd += list(snakemake_args)
        log.info("reproducing %s in %s: %s", target, scratch_dir, " ".join(cmd))
        proc = subprocess.run(cmd, cwd=scratch_dir, capture_output=True, text=True, timeout=None)
        result["command"] = cmd
        if proc.returncode != 0:
            result["ok"] = False
            result["error"] = proc.stderr[-4000:]
            result["comparisons"].append(
                {"path": target, "result": "failed", "detail": "snakemake failed; see error"}
            )
            return result
        tol = _tolerance(record["rule"], tolerances)
        all_ok = True
        for out, sha in record["outputs"].items():
            new = scratch_dir / out
            now = current_digest(new, sha)
            if now == sha:
                cmp = {"path": out, "result": "identical", "detail": "bitwise equal (sha256)"}
            elif now is None:
                cmp = {"path": out, "result": "missing", "detail": "not rebuilt"}
                all_ok = False
            elif tol is not None:
                ok, detail = compare_within_tolerance(root / out, new, tol["rtol"], tol["atol"])
                cmp = {
                    "path": out,
                    "result": "within tolerance" if ok else "differs",
                    "detail": detail,
                }
                all_ok &= ok
            else:
                cmp = {
                    "path": out,
                    "result": "differs",
                    "detail": f"deterministic stage: sha256 {now} != recorded {sha}",
                }
                all_ok = False
            result["comparisons"].append(cmp)
        result["ok"] = all_ok
        return result
    finally:
        if not keep_scratch and scratch is None:
            shutil.rmtree(scratch_dir, ignore_errors=True)


def summarize(findings: Iterable[Finding]) -> str:
    """One line per finding (for terminals)."""
    return "\n".join(
        f"{f.severity.upper():7} {f.kind:18} {f.path or '-'}  [{f.record or '-'}] {f.message}"
        for f in findings
    )
