"""Install the project's Slurm profile where Snakemake looks for profiles, with site settings.

``snakemake --profile slurm`` searches ``./slurm``, the user config folder
(``~/.config/snakemake/slurm``, honouring ``XDG_CONFIG_HOME``) and the site folder
(``/etc/xdg/snakemake/slurm``); the checkout keeps the profile in ``profiles/slurm``.
:func:`install_profile` copies it there once and writes the site's settings (partitions, account,
QoS, constraint, GPU model, any executor flag or resource) into the installed copy, so neither the
rules nor the repository's profile are edited per site.

Partitions are chosen by the Slurm executor plugin's partition auto-selection
(``slurm-partition-config``): the installer writes ``partitions.yaml`` beside the profile in which
the CPU partition takes no GPUs, so every job with ``gpu > 0`` (from the profile or a rule's
``resources``) goes to the GPU partition and the rest to the CPU partition.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

PROFILE_FILE = "config.v8+.yaml"
PARTITIONS_FILE = "partitions.yaml"


def user_profile_root() -> Path:
    """Snakemake's per-user profile folder (``~/.config/snakemake`` or ``$XDG_CONFIG_HOME/...``)."""
    from snakemake.common import get_appdirs

    return Path(get_appdirs().user_config_dir)


def site_profile_root() -> Path:
    """Snakemake's system-wide profile folder (``/etc/xdg/snakemake``)."""
    from snakemake.common import get_appdirs

    return Path(get_appdirs().site_config_dir)


def find_source_profile(name: str = "slurm", start: Path | None = None) -> Path:
    """The repository's ``profiles/<name>``: searched upwards from ``start`` (default: cwd), then
    beside the installed package (an editable install of the checkout)."""
    candidates = []
    here = (start or Path.cwd()).resolve()
    candidates += [parent / "profiles" / name for parent in (here, *here.parents)]
    candidates.append(Path(__file__).resolve().parents[2] / "profiles" / name)
    for candidate in candidates:
        if (candidate / PROFILE_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"no profiles/{name}/{PROFILE_FILE} found above {here} or beside the package; "
        "run this from the CXR Foundry checkout or pass --source"
    )


def _resource_literal(value: Any) -> Any:
    """Resource values in a profile are Python expressions: quote strings so they stay strings."""
    return repr(value) if isinstance(value, str) else value


def _parse_assignment(text: str, what: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"{what} {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def apply_site_settings(
    profile: dict[str, Any],
    *,
    cpu_partition: str | None = None,
    gpu_partition: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    constraint: str | None = None,
    gpu_model: str | None = None,
    settings: Sequence[str] = (),
    resources: Sequence[str] = (),
) -> dict[str, Any]:
    """Return a copy of a parsed profile with the site's settings applied.

    ``settings`` are ``FLAG=VALUE`` executor/Snakemake flags (``slurm-status-command=sacct``);
    ``resources`` are ``RULE:KEY=VALUE`` (``RULE`` ``*`` means every job: default-resources).
    Partitions are not written here (see :func:`partition_config`).
    """
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in profile.items()}
    defaults: dict[str, Any] = dict(out.get("default-resources") or {})
    per_rule: dict[str, dict[str, Any]] = {
        rule: dict(res or {}) for rule, res in (out.get("set-resources") or {}).items()
    }
    if account:
        defaults["slurm_account"] = _resource_literal(account)
    if constraint:
        defaults["constraint"] = _resource_literal(constraint)
    if qos:
        out["slurm-qos"] = qos
    if gpu_model:
        for res in per_rule.values():
            if res.get("gpu"):
                res["gpu_model"] = _resource_literal(gpu_model)
    if cpu_partition and not gpu_partition:
        defaults["slurm_partition"] = _resource_literal(cpu_partition)
    elif gpu_partition and not cpu_partition:
        for res in per_rule.values():
            if res.get("gpu") or "gpu" in str(res.get("gres", "")):
                res["slurm_partition"] = _resource_literal(gpu_partition)
    for item in settings:
        key, value = _parse_assignment(item, "--set")
        out[key.lstrip("-")] = value
    for item in resources:
        target, _, assignment = item.partition(":")
        if not assignment:
            raise ValueError(f"--resource {item!r}: expected RULE:KEY=VALUE")
        key, value = _parse_assignment(assignment, "--resource")
        bucket = defaults if target == "*" else per_rule.setdefault(target, {})
        bucket[key] = _resource_literal(value)
    out["default-resources"] = defaults
    out["set-resources"] = per_rule
    return out


def partition_config(cpu_partition: str, gpu_partition: str, max_gpus: int = 8) -> dict[str, Any]:
    """Partition limits for the plugin's auto-selection: GPU jobs can only fit the GPU partition,
    and CPU jobs prefer the CPU partition (the plugin penalises GPU partitions for them)."""
    return {
        "partitions": {
            cpu_partition: {"max_gpu": 0},
            gpu_partition: {"max_gpu": int(max_gpus)},
        }
    }


def install_profile(
    source: Path | None = None,
    dest_root: Path | None = None,
    name: str = "slurm",
    *,
    cpu_partition: str | None = None,
    gpu_partition: str | None = None,
    max_gpus_per_node: int = 8,
    partitions_file: Path | None = None,
    account: str | None = None,
    qos: str | None = None,
    constraint: str | None = None,
    gpu_model: str | None = None,
    settings: Sequence[str] = (),
    resources: Sequence[str] = (),
    force: bool = False,
) -> Path:
    """Install ``source`` (default: the checkout's ``profiles/slurm``) as ``dest_root/name``.

    ``dest_root`` defaults to Snakemake's user profile folder. An existing installation is kept
    unless ``force``. ``partitions_file`` (a plugin partition-limits YAML, e.g. from
    ``--slurm-partition-config`` docs) replaces the generated CPU/GPU one. Returns the
    installed profile folder.
    """
    source = Path(source) if source else find_source_profile(name)
    if not (source / PROFILE_FILE).is_file():
        raise FileNotFoundError(f"{source}: no {PROFILE_FILE} (not a profile folder)")
    dest = Path(dest_root or user_profile_root()) / name
    if dest.exists() and not force:
        raise FileExistsError(f"{dest} already exists; pass --force to replace it")
    profile = yaml.safe_load((source / PROFILE_FILE).read_text(encoding="utf-8")) or {}
    if not isinstance(profile, dict):
        raise ValueError(f"{source / PROFILE_FILE}: not a YAML mapping")
    one_partition = bool(cpu_partition) != bool(gpu_partition)
    profile = apply_site_settings(
        profile,
        cpu_partition=cpu_partition if one_partition else None,
        gpu_partition=gpu_partition if one_partition else None,
        account=account,
        qos=qos,
        constraint=constraint,
        gpu_model=gpu_model,
        settings=settings,
        resources=resources,
    )
    partitions: dict[str, Any] | None = None
    if partitions_file:
        partitions = yaml.safe_load(Path(partitions_file).read_text(encoding="utf-8"))
        if not isinstance(partitions, dict) or "partitions" not in partitions:
            raise ValueError(f"{partitions_file}: expected a mapping with a 'partitions' key")
    elif cpu_partition and gpu_partition:
        partitions = partition_config(cpu_partition, gpu_partition, max_gpus_per_node)
    if partitions is not None:
        # A relative path is resolved against the profile folder by Snakemake's profile loader.
        profile["slurm-partition-config"] = PARTITIONS_FILE

    staging = dest.with_name(f".{dest.name}.installing")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    header = (
        f"# Installed by `cxrfoundry install-profile` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n"
        f"# from {source.resolve() / PROFILE_FILE} (read it for what every key does).\n"
        "# Re-run the installer with --force to change site settings.\n"
    )
    body = yaml.safe_dump(profile, sort_keys=False, default_flow_style=False)
    (staging / PROFILE_FILE).write_text(header + body, encoding="utf-8")
    if partitions is not None:
        (staging / PARTITIONS_FILE).write_text(
            yaml.safe_dump(partitions, sort_keys=False), encoding="utf-8"
        )
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(dest)
    log.info("installed profile %r at %s", name, dest)
    return dest
