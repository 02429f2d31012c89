"""Provenance: code hashes for rerun triggers and the per-job provenance record.

Snakemake does not rerun a rule when a library module it uses changes. Each rule therefore passes
``code_hash(...)`` of the modules its script calls as a ``params:`` entry; the hash covers those
modules and, transitively, every ``cxrfoundry`` module they import. It is computed from source
text with ``ast`` (nothing is imported), so planning a workflow stays fast.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import os
import re
import socket
import subprocess
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

PACKAGE = "cxrfoundry"
PACKAGE_ROOT = Path(__file__).resolve().parent

#: Distributions whose versions every record lists.
TRACKED_PACKAGES: tuple[str, ...] = (
    "cxrfoundry",
    "torch",
    "numpy",
    "pyarrow",
    "polars",
    "pydicom",
    "pillow",
    "snakemake",
    "transformers",
    "diffusers",
    "mlflow",
    "openai",
    "scikit-learn",
    "torchmetrics",
)

_SECRET_KEY = re.compile(r"(key|token|secret|password|passwd|credential|auth)", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def module_path(module: str) -> Path:
    """Source file of a ``cxrfoundry`` module (a package resolves to its ``__init__.py``)."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        raise ValueError(f"{module!r} is not a {PACKAGE} module")
    relative = Path(*module.split(".")[1:])
    candidate = PACKAGE_ROOT / relative
    if candidate.is_dir():
        return candidate / "__init__.py"
    path = candidate.with_suffix(".py")
    if not path.is_file():
        raise FileNotFoundError(f"no source for module {module!r} (looked for {path})")
    return path


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    parts = module.split(".")
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            found.add(target)
            # ``from pkg import mod`` may name submodules.
            for alias in node.names:
                found.add(f"{target}.{alias.name}")
    resolved = set()
    for name in found:
        try:
            module_path(name)
        except (FileNotFoundError, ValueError):
            continue
        resolved.add(name)
    return resolved


@cache
def module_closure(modules: tuple[str, ...]) -> tuple[str, ...]:
    """The given modules plus every ``cxrfoundry`` module they import, transitively, sorted."""
    seen: set[str] = set()
    stack = list(modules)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        # A submodule import also runs its parent packages' __init__.
        parent = name.rsplit(".", 1)[0]
        if "." in name and parent not in seen:
            stack.append(parent)
        stack.extend(_imports(name, module_path(name)) - seen)
    return tuple(sorted(seen))


def code_hash(*modules: str) -> str:
    """sha256 over the source of ``modules`` and their transitive ``cxrfoundry`` imports."""
    digest = hashlib.sha256()
    for name in module_closure(tuple(sorted(modules))):
        digest.update(name.encode() + b"\0" + module_path(name).read_bytes() + b"\0")
    return digest.hexdigest()


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable sha256 of a (JSON-serialisable) config mapping."""
    from cxrfoundry.io import dumps_json

    return hashlib.sha256(dumps_json(redact(config)).encode()).hexdigest()


def redact(value: Any, key: str = "") -> Any:
    """Copy ``value`` with secret-looking keys masked and credentials stripped from URLs.

    Keys that only *name* where a secret lives (``api_key_env``, ``token_env``) are kept: they are
    not secrets and the record is more useful with them.
    """
    if isinstance(value, Mapping):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if key and _SECRET_KEY.search(key) and not key.endswith("_env") and value not in (None, ""):
        return "***"
    if isinstance(value, str):
        return _URL_USERINFO.sub(r"\g<scheme>***@", value)
    return value


@cache
def git_commit(cwd: str | None = None) -> str | None:
    """Commit of the code's git checkout (suffixed ``-dirty`` if it has changes), or None.

    Defaults to the checkout holding this package, not the workflow's working directory.
    """
    cwd = cwd or str(PACKAGE_ROOT)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


@cache
def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (missing ones are omitted)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def host_info() -> dict[str, Any]:
    """Host name and Slurm job identity where the job runs."""
    return {
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
