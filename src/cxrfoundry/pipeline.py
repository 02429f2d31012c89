"""The per-job adapter between a Snakemake script and the library.

Every script in ``workflow/scripts/`` runs its one library call inside :class:`Step`::

    with Step(snakemake) as step:
        counts = ingest_dataset(...)
        step.log_metrics(counts)

``Step`` sends logging to the rule's log file (secrets masked), opens an MLflow run tagged with
the rule, wildcards, git commit and config hash, and on success writes the job's provenance
record (DESIGN.md section 3) to ``results/provenance/{rule}/{key}.json``. On failure it marks the
run FAILED and writes no record, so nothing looks finished.

Evaluation rules name the model they evaluate with a ``model_dir`` param (e.g.
``results/models/dino``): their run then goes to the MLflow experiment of the run that produced
that model (found through the model's provenance record) as a child of it
(``mlflow.parentRunId``), tagged ``model_run_id``. Without a producing run (random-init
baselines, external backbones) it goes to the workflow's experiment.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxrfoundry import provenance, tracking
from cxrfoundry.io import sha256_file, sha256_tree, write_json

log = logging.getLogger(__name__)

PROVENANCE_DIR = Path("results/provenance")
#: Environment variables whose values are always masked in logs, besides those named in config.
SECRET_ENV_VARS = ("OPENAI_API_KEY", "PHYSIONET_PASSWORD", "KAGGLE_KEY", "HF_TOKEN")


class SecretFilter(logging.Filter):
    """Mask the values of secret environment variables in every log record."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
        return True


def secret_values(config: Mapping[str, Any]) -> list[str]:
    """Values of environment variables named by ``*_env`` config keys and the known secret vars."""
    names = set(SECRET_ENV_VARS)

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif key.endswith("_env") and isinstance(value, str):
            names.add(value)

    walk(config)
    return [os.environ[n] for n in names if os.environ.get(n)]


def _flat_paths(files: Any) -> list[str]:
    if files is None:
        return []
    if isinstance(files, str | os.PathLike):
        return [str(files)]
    if isinstance(files, Mapping):
        files = files.values()
    paths: list[str] = []
    for item in files:
        paths.extend(_flat_paths(item))
    return paths


def file_digest(path: str) -> str | None:
    """sha256 of a file, or of a folder's contents; a raw folder is named by its manifest's hash."""
    target = Path(path)
    if target.is_file():
        return sha256_file(target)
    if target.is_dir():
        manifest = target.with_name(target.name + ".manifest.json")
        if manifest.is_file():
            return "manifest:" + sha256_file(manifest)
        return sha256_tree(target)
    return None


def producing_run(output: str | os.PathLike[str] | None) -> str | None:
    """MLflow run id of the job whose provenance record lists ``output`` (None if none)."""
    if not output or not PROVENANCE_DIR.is_dir():
        return None
    target = os.path.normpath(str(output))
    for path in sorted(PROVENANCE_DIR.glob("*/*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        outputs = record.get("outputs") or {}
        if any(os.path.normpath(o) == target for o in outputs):
            return record.get("mlflow_run_id")
    return None


def job_key(wildcards: Mapping[str, str]) -> str:
    """File-name-safe key of a job: wildcard values joined by ``__``, or ``all``."""
    values = [str(v).replace("/", "_") for v in wildcards.values()]
    return "__".join(values) if values else "all"


class Step:
    """Context manager wrapping one Snakemake job (see the module docstring)."""

    def __init__(self, smk: Any) -> None:
        self.smk = smk
        self.rule = str(smk.rule)
        self.wildcards = {k: str(v) for k, v in dict(smk.wildcards.items()).items()}
        self.config: Mapping[str, Any] = smk.config
        self.params = {k: v for k, v in dict(smk.params.items()).items()}
        code = self.params.get("code") or {}
        self.modules: tuple[str, ...] = tuple(code.get("modules", ()))
        self.code_sha256: str | None = code.get("sha256")
        mlflow_cfg = self.config.get("mlflow", {})
        self.track = mlflow_cfg.get("enabled", True)
        self.run: tracking.Run | None = None
        self.started = 0.0
        self.metrics: dict[str, Any] = {}

    @property
    def log_path(self) -> str | None:
        """The rule's log file."""
        logs = _flat_paths(self.smk.log)
        return logs[0] if logs else None

    def _setup_logging(self) -> None:
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        secret_filter = SecretFilter(secret_values(self.config))
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
        if self.log_path:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(self.log_path, mode="w", encoding="utf-8"))
        for handler in handlers:
            handler.setFormatter(fmt)
            handler.addFilter(secret_filter)
            root.addHandler(handler)
        logging.captureWarnings(True)

    def __enter__(self) -> Step:
        self._setup_logging()
        self.started = time.time()
        log.info("rule %s %s starting", self.rule, self.wildcards)
        mlflow_cfg = self.config.get("mlflow", {})
        default_experiment = f"cxrfoundry-{self.config.get('name', 'default')}"
        experiment = mlflow_cfg.get("experiment") or default_experiment
        tags = {
            "rule": self.rule,
            "git_commit": provenance.git_commit() or "unknown",
            "config_sha256": provenance.config_hash(self.config),
            **{f"wildcard.{k}": v for k, v in self.wildcards.items()},
        }
        if job := os.environ.get("SLURM_JOB_ID"):
            tags["slurm_job_id"] = job
        run_name = f"{self.rule}:{job_key(self.wildcards)}"
        parent = producing_run(self.params.get("model_dir")) if self.track else None
        self.run = tracking.Run(
            mlflow_cfg,
            experiment=experiment,
            run_name=run_name,
            tags=tags,
            enabled=self.track,
            parent_run_id=parent,
        )
        self.run.log_params(tracking.flatten(provenance.redact(self._loggable_params())))
        return self

    def _loggable_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.params.items() if not k.startswith("_")}

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record metrics in MLflow and in the provenance record."""
        flat = tracking.flatten(metrics)
        self.metrics.update(flat)
        if self.run:
            self.run.log_metrics(flat, step=step)

    def log_artifact(self, path: str | os.PathLike[str]) -> None:
        """Attach a file to the job's MLflow run."""
        if self.run:
            self.run.log_artifact(path)

    def __exit__(self, exc_type, exc, tb) -> bool:
        ended = time.time()
        if exc is not None:
            log.error("rule %s failed: %s", self.rule, exc, exc_info=(exc_type, exc, tb))
            if self.run:
                self.run.end("FAILED")
            return False
        record = self.record(ended)
        write_json(PROVENANCE_DIR / self.rule / f"{job_key(self.wildcards)}.json", record)
        if self.run:
            self.run.log_metrics({"duration_s": ended - self.started})
            self.run.end("FINISHED")
        log.info("rule %s finished in %.1f s", self.rule, ended - self.started)
        return False

    def record(self, ended: float) -> dict[str, Any]:
        """The provenance record of this job (DESIGN.md section 3)."""
        inputs = {p: file_digest(p) for p in _flat_paths(self.smk.input)}
        outputs = {p: file_digest(p) for p in _flat_paths(self.smk.output)}
        iso = lambda t: datetime.fromtimestamp(t, UTC).isoformat()  # noqa: E731
        return {
            "rule": self.rule,
            "wildcards": self.wildcards,
            "inputs": inputs,
            "outputs": outputs,
            "params": provenance.redact(self._loggable_params()),
            "config_sha256": provenance.config_hash(self.config),
            "code_sha256": self.code_sha256,
            "code_modules": list(provenance.module_closure(self.modules)) if self.modules else [],
            "git_commit": provenance.git_commit(),
            "packages": provenance.package_versions(),
            "seed": self.config.get("seed"),
            **provenance.host_info(),
            "started": iso(self.started),
            "ended": iso(ended),
            "mlflow_run_id": self.run.run_id if self.run else None,
            "log": self.log_path,
            "metrics": self.metrics,
        }
