"""MLflow tracking used by every stage.

One experiment per workflow config, one run per job, tagged with rule, wildcards, git commit and
config hash. The default store is ``sqlite:///results/mlflow.db`` with artifacts under
``results/mlartifacts``; ``MLFLOW_TRACKING_URI`` overrides. The SQLite store must be created
once before parallel jobs start (its first use runs migrations that race): the Snakefile's
``onstart`` calls :func:`init_store`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_DB = "results/mlflow.db"
#: Characters MLflow does not allow in metric names.
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. :/]")
DEFAULT_ARTIFACTS = "results/mlartifacts"


def tracking_uri(cfg: Mapping[str, Any], workdir: Path | None = None) -> str:
    """Resolve the tracking URI: environment, then config, then SQLite under results/."""
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    if uri := cfg.get("tracking_uri"):
        return str(uri)
    root = (workdir or Path.cwd()).resolve()
    return f"sqlite:///{root / DEFAULT_DB}"


def artifact_location(cfg: Mapping[str, Any], workdir: Path | None = None) -> str:
    """Artifact root for new experiments (a file URI under results/ by default)."""
    if loc := cfg.get("artifact_location"):
        return str(loc)
    return (Path(workdir or Path.cwd()).resolve() / DEFAULT_ARTIFACTS).as_uri()


def _retry(fn, *args, attempts: int = 8, **kwargs):
    # Parallel jobs share one SQLite file: writers can briefly see "database is locked".
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # mlflow wraps sqlalchemy errors in several types
            if "locked" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    return None


def init_store(cfg: Mapping[str, Any], experiment: str, workdir: Path | None = None) -> str:
    """Create the tracking store and the experiment once; return the experiment id."""
    import mlflow

    uri = tracking_uri(cfg, workdir)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(experiment, artifact_location=artifact_location(cfg, workdir))


class Run:
    """An MLflow run for one job; every call is a no-op when tracking is disabled."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        *,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str],
        enabled: bool = True,
        parent_run_id: str | None = None,
    ) -> None:
        """``parent_run_id`` (the run that produced the model this job evaluates): the run is
        created in that run's experiment, as its child; ``experiment`` is the fallback."""
        self.enabled = enabled
        self.run_id: str | None = None
        self._client = None
        if not enabled:
            return
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(cfg))
        self._client = mlflow.MlflowClient()
        tags = dict(tags)
        experiment_id = None
        if parent_run_id:
            tags["model_run_id"] = parent_run_id
            try:
                parent = _retry(self._client.get_run, parent_run_id)
            except Exception as exc:  # a run of another tracking store: fall back, say so
                log.warning("producing run %s not in this store (%s)", parent_run_id, exc)
            else:
                experiment_id = parent.info.experiment_id
                tags["mlflow.parentRunId"] = parent_run_id
        if experiment_id is None:
            experiment_id = _retry(init_store, cfg, experiment)
        run = _retry(self._client.create_run, experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat params (values stringified, truncated to MLflow's limit)."""
        if not self.enabled:
            return
        for key, value in params.items():
            _retry(self._client.log_param, self.run_id, key, str(value)[:6000])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics; non-numeric values are skipped."""
        if not self.enabled:
            return
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            # MLflow rejects some characters in names (e.g. "+" in "real+1x"): map them to "_".
            name = _METRIC_NAME.sub("_", str(key))
            _retry(self._client.log_metric, self.run_id, name, float(value), step=step or 0)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a file into the run's artifacts."""
        if self.enabled:
            _retry(self._client.log_artifact, self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with ``status`` (FINISHED or FAILED)."""
        if self.enabled and self.run_id:
            _retry(self._client.set_terminated, self.run_id, status)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys (for params and metrics)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
