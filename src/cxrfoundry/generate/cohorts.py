"""Synthetic cohorts: plan, generate and shard synthetic radiographs from a cohort spec.

A cohort spec (``config/cohorts/{cohort}.yaml``, validated against
``config/schema/cohort.schema.yaml``) says which images to make; one spec is one
``synthesize_cohort`` job. Three kinds:

* ``matched`` — one image per real case of ``corpus``/``split`` (``multiplicity: k`` gives k,
  each with its own seed), prompted by the case's report (``prompt: report``) or by a template
  report written from its labels and demographics (``prompt: template``);
* ``stratified`` — ``count`` images per cell of sex × age group × race × findings, prompted by
  template reports of the cell's metadata;
* ``balance`` — the subgroups of ``corpus``/``split`` (intersections of ``attributes``) that
  are smaller than the largest one are topped up to parity with images of their own cases.

Every synthetic image keeps the labels, sex, age, race and view it was conditioned on. With
``controlnet: true`` (matched, balance) it is also conditioned on its source case's masks and
boxes, which the cohort keeps.

Output (the contract other stages read; docs/chexgen.md): ``results/cohorts/{cohort}/`` with
``{split}-{NNNNN}.parquet`` in exactly :data:`cxrfoundry.schema.SHARD_SCHEMA` plus
:data:`SYNTHETIC_FIELDS` (``synthetic``, ``source_image_id``, ``seed``, ``guidance``), an
``index.json`` (shards, rows, sha256, and the spec, model and sampling settings) and
``rejects.parquet``. ``image_id`` is ``synthetic/{cohort}/{n:06d}``, ``dataset`` is
``synthetic`` and ``patient_id`` is ``syn:`` + the source patient (stratified: the image), so
a patient bootstrap treats all images of one source patient as one unit.

The shards are written by :func:`cxrfoundry.data.shards.write_shards` (same encoding, row
groups, index and rejects as the real corpus) from PNGs generated into a work folder; the four
synthetic columns are then joined on by ``image_id`` and the index updated. Generation is
resumable: images already in the work folder for the same plan fingerprint are kept.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxrfoundry import io as cio
from cxrfoundry.data import imaging
from cxrfoundry.data import shards as shards_lib
from cxrfoundry.schema import (
    FINDING_COLUMN_BY_NAME,
    FINDING_COLUMNS,
    REPORTS_SCHEMA,
    SHARD_SCHEMA,
    conform,
)

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("matched", "stratified", "balance")
#: Columns a cohort adds to the shard schema.
SYNTHETIC_FIELDS: tuple[pa.Field, ...] = (
    pa.field("synthetic", pa.bool_(), nullable=False),
    pa.field("source_image_id", pa.string()),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("guidance", pa.float64(), nullable=False),
)
#: The schema of every cohort shard.
COHORT_SCHEMA = pa.schema([*SHARD_SCHEMA, *SYNTHETIC_FIELDS])
DATASET = "synthetic"
#: Pathologies: findings that make No Finding negative (Support Devices may coexist with it).
_NOT_PATHOLOGY = {"No Finding", "Support Devices"}
#: Source shard columns a plan reads (images only where a ControlNet needs the mask size).
SOURCE_COLUMNS: tuple[str, ...] = tuple(
    f.name for f in REPORTS_SCHEMA if f.name not in ("image_path", "mask_path")
)
SEED_STRIDE = 1_000_003


# --------------------------------------------------------------------------- specs


def _validator(schema: Mapping[str, Any]):
    """A JSON-schema validator that also fills ``default`` values in (as Snakemake's does)."""
    from jsonschema import Draft202012Validator, validators

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(key, json.loads(json.dumps(sub["default"])))
        yield from Draft202012Validator.VALIDATORS["properties"](
            validator, properties, instance, schema
        )

    cls = validators.extend(Draft202012Validator, {"properties": set_defaults})
    return cls(schema)


def validate_spec(
    spec: Mapping[str, Any], schema: Mapping[str, Any] | str | os.PathLike[str], *, name: str
) -> dict[str, Any]:
    """``spec`` checked against the cohort schema (a mapping or a YAML file), defaults filled.

    Beyond the schema: finding names must be CheXpert display names, stratified age groups must
    be named in ``age_bins``, and matched/balance cohorts need a ``corpus``. Errors name the
    cohort and the offending key.
    """
    if not isinstance(schema, Mapping):
        schema = _read_yaml(Path(schema))
    out = json.loads(json.dumps(dict(spec)))
    errors = sorted(_validator(schema).iter_errors(out), key=lambda e: list(e.absolute_path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(top level)"
        raise ValueError(f"cohort {name!r}: {where}: {errors[0].message}")
    if out["kind"] in ("matched", "balance") and not out.get("corpus"):
        raise ValueError(f"cohort {name!r}: a {out['kind']} cohort needs a corpus")
    if out["kind"] == "stratified":
        strata = out["strata"]
        bins = [b[0] for b in out["age_bins"]]
        strata.setdefault("age", bins)
        unknown = sorted(set(strata["age"]) - set(bins))
        if unknown:
            raise ValueError(f"cohort {name!r}: strata/age: groups {unknown} not in age_bins")
        for combo in strata["findings"]:
            bad = sorted(set(combo) - set(FINDING_COLUMN_BY_NAME))
            if bad or "No Finding" in combo:
                raise ValueError(
                    f"cohort {name!r}: strata/findings: {bad or ['No Finding']} are not "
                    "finding names (use [] for No Finding)"
                )
    out["name"] = name
    return out


def _read_yaml(path: Path) -> Any:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc


def load_spec(
    path: str | os.PathLike[str], schema: Mapping[str, Any] | str | os.PathLike[str]
) -> dict[str, Any]:
    """Read and validate a cohort spec YAML; the cohort is named after the file's stem."""
    path = Path(path)
    spec = _read_yaml(path)
    if not isinstance(spec, Mapping):
        raise ValueError(f"{path}: a cohort spec must be a mapping, got {type(spec).__name__}")
    try:
        return validate_spec(spec, schema, name=path.stem)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def sampling_settings(spec: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's steps/guidance where set, else the workflow's ``chexgen.sampling``."""
    out = dict(defaults)
    for key in ("num_inference_steps", "guidance_scale"):
        if spec.get(key) is not None:
            out[key] = spec[key]
    return out


# --------------------------------------------------------------------------- planning


def read_source(
    shards_dir: str | os.PathLike[str], split: str, *, with_masks: bool = False
) -> pa.Table:
    """The ``split`` rows of a shard folder (report columns; ``mask``/``boxes``/size with
    ``with_masks``), sorted by ``image_id`` so a plan does not depend on shard order."""
    from cxrfoundry.data.dataset import list_shards

    paths = list_shards(shards_dir, split)
    if not paths:
        raise ValueError(f"{shards_dir}: no shards for split {split!r}")
    columns = list(SOURCE_COLUMNS) + (["mask", "height", "width"] if with_masks else [])
    table = pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])
    return table.sort_by("image_id")


def _seed(workflow_seed: int, spec: Mapping[str, Any], n: int) -> int:
    return ((int(workflow_seed) + int(spec.get("seed", 0))) * SEED_STRIDE + n) % (2**63)


def _age_group(age: Any, bins: Sequence[Sequence[Any]]) -> str:
    from cxrfoundry.eval.fairness import age_groups

    return str(age_groups(np.asarray([np.nan if age is None else age]), bins)[0])


def subgroup(row: Mapping[str, Any], attributes: Sequence[str], bins: Sequence[Sequence[Any]]):
    """The ``&``-joined subgroup of a row over ``attributes``; ``""`` if any is unknown."""
    parts = []
    for attr in attributes:
        value = _age_group(row.get("age"), bins) if attr == "age" else row.get(attr)
        if not value:
            return ""
        parts.append(str(value))
    return "&".join(parts)


def _synthetic_row(
    source: Mapping[str, Any] | None,
    spec: Mapping[str, Any],
    n: int,
    *,
    seed: int,
    guidance: float,
    report_seed: int,
    cell: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One planned image: the source case's (or stratified ``cell``'s) metadata and labels,
    new ids, the prompt and the seed."""
    from cxrfoundry.reports.template import template_report

    name = spec["name"]
    image_id = f"{DATASET}/{name}/{n:06d}"
    row: dict[str, Any] = {c: None for c in FINDING_COLUMNS}
    extra = {"cohort": name, "kind": spec["kind"], "prompt": spec["prompt"]}
    if source is not None:
        row.update({c: source.get(c) for c in FINDING_COLUMNS})
        row.update({k: source.get(k) for k in ("view", "view_raw", "sex", "age", "race")})
        row.update(
            {
                "patient_id": f"syn:{source['patient_id']}",
                "study_id": f"syn:{source['study_id']}",
                "source_image_id": source["image_id"],
                "report_source": source.get("report_source") or "template",
                "qc_status": source.get("qc_status") or "pass",
                "boxes": source.get("boxes") if spec.get("controlnet") else None,
                "_mask": source.get("mask") if spec.get("controlnet") else None,
                "_size": (source.get("height"), source.get("width")),
            }
        )
        extra["source_dataset"] = source.get("dataset")
        report = source.get("report")
    else:
        row.update({"patient_id": f"syn:{image_id}", "study_id": f"syn:{image_id}"})
        row.update({"source_image_id": None, "report_source": "template", "qc_status": "pass"})
        row.update(cell or {})
        report = None
    row.update(
        {
            "image_id": image_id,
            "dataset": DATASET,
            "image_path": f"images/{n:06d}.png",
            "view_source": "metadata",
            "split": spec["split"],
            "qc_flags": "[]",
            "labels_extra": json.dumps(extra, sort_keys=True),
            "seed": int(seed),
            "guidance": float(guidance),
            "synthetic": True,
        }
    )
    if spec["prompt"] == "template" or not report:
        report = template_report(row, seed=report_seed)
        row["report_source"] = "template"
    row["report"] = report
    return row


def plan_cohort(
    spec: Mapping[str, Any],
    source: pa.Table | None,
    *,
    seed: int,
    guidance: float,
) -> list[dict[str, Any]]:
    """The images of a cohort, in order: one dict per image (cohort columns + private keys).

    ``source`` holds the real split's rows (:func:`read_source`; ``None`` for stratified
    cohorts). Deterministic in (spec, source, seed). Raises ``ValueError`` when a matched or
    balance cohort has no source rows.
    """
    kind = spec["kind"]
    if kind not in KINDS:
        raise ValueError(f"cohort {spec.get('name')!r}: unknown kind {kind!r}")
    cases: list[dict[str, Any] | None]
    if kind in ("matched", "balance"):
        if source is None or source.num_rows == 0:
            raise ValueError(f"cohort {spec['name']!r}: the source split has no rows")
        rows = source.to_pylist()
        if spec.get("max_cases"):
            rows = rows[: int(spec["max_cases"])]
        if kind == "matched":
            k = int(spec.get("multiplicity", 1))
            cases = [r for r in rows for _ in range(k)]
        else:
            cases = list(_balance_cases(spec, rows, seed))
        stratified_rows: list[dict[str, Any]] = []
    else:
        stratified_rows = _stratified_rows(spec, seed)
        cases = [None] * len(stratified_rows)
    return [
        _synthetic_row(
            case,
            spec,
            n,
            seed=_seed(seed, spec, n),
            guidance=guidance,
            report_seed=seed,
            cell=stratified_rows[n] if case is None else None,
        )
        for n, case in enumerate(cases)
    ]


def balance_counts(
    spec: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, int], dict[str, int]]:
    """(real images per subgroup, synthetic images to add per subgroup) of a balance spec."""
    from cxrfoundry.eval.fairness import balance_plan

    groups = [subgroup(r, spec["attributes"], spec["age_bins"]) for r in rows]
    names, counts = np.unique(
        np.asarray([g for g in groups if g], dtype=object), return_counts=True
    )
    real = {str(g): int(c) for g, c in zip(names, counts, strict=True)}
    return real, balance_plan(np.asarray(groups, dtype=object), spec["target"])


def _balance_cases(spec: Mapping[str, Any], rows: list[dict[str, Any]], seed: int):
    """Source cases for the missing images of each subgroup: a seeded permutation of the
    subgroup's cases, cycled when more images are wanted than it has cases."""
    _, todo = balance_counts(spec, rows)
    groups = [subgroup(r, spec["attributes"], spec["age_bins"]) for r in rows]
    for g_index, (group, wanted) in enumerate(sorted(todo.items())):
        members = [r for r, g in zip(rows, groups, strict=True) if g == group]
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(spec["seed"]), g_index]))
        order: list[int] = []
        while len(order) < wanted:
            order.extend(rng.permutation(len(members)).tolist())
        for i in order[:wanted]:
            yield members[i]


def stratified_cells(spec: Mapping[str, Any]) -> list[tuple[str, str, str, tuple[str, ...], int]]:
    """(sex, age group, race, findings, count) per cell of a stratified spec, in order."""
    strata = spec["strata"]
    cells = []
    for sex, age, race, combo in itertools.product(
        strata["sex"], strata["age"], strata["race"], strata["findings"]
    ):
        findings = tuple(combo)
        key = "&".join([sex, age, race, "+".join(findings) or "No Finding"])
        cells.append((sex, age, race, findings, int(spec["counts"].get(key, spec["count"]))))
    return cells


def _stratified_rows(spec: Mapping[str, Any], seed: int) -> list[dict[str, Any]]:
    bins = {b[0]: b for b in spec["age_bins"]}
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(spec["seed"]), 0x57]))
    out = []
    for sex, age_name, race, findings, count in stratified_cells(spec):
        _, low, high = bins[age_name]
        high = float(high) if high is not None else float(low) + 24
        labels = {c: 0 for c in FINDING_COLUMNS}
        for name in findings:
            labels[FINDING_COLUMN_BY_NAME[name]] = 1
        pathology = any(f not in _NOT_PATHOLOGY for f in findings)
        labels["no_finding"] = 0 if pathology else 1
        for _ in range(count):
            age = float(rng.integers(int(low), int(high) + 1))
            out.append(
                {
                    **labels,
                    "sex": sex,
                    "age": age,
                    "race": race,
                    "view": spec["view"],
                    "view_raw": spec["view"],
                }
            )
    return out


def plan_summary(plan: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts of a plan: images, distinct sources, per sex/race/view and positives per finding."""

    def count(key: str) -> dict[str, int]:
        values = [str(r.get(key)) for r in plan]
        return {k: values.count(k) for k in sorted(set(values))}

    return {
        "images": len(plan),
        "sources": len({r["source_image_id"] for r in plan if r.get("source_image_id")}),
        "sex": count("sex"),
        "race": count("race"),
        "view": count("view"),
        "positives": {c: sum(r.get(c) == 1 for r in plan) for c in FINDING_COLUMNS},
    }


def fingerprint(plan: Sequence[Mapping[str, Any]], extra: Mapping[str, Any]) -> str:
    """Hash of everything that decides the generated pixels (prompts, seeds, conditions,
    sampling settings, model weights in ``extra``)."""
    digest = hashlib.sha256(cio.dumps_json(dict(extra)).encode())
    for row in plan:
        mask = row.get("_mask")
        digest.update(
            json.dumps(
                [
                    row["report"],
                    row["seed"],
                    row["guidance"],
                    row.get("boxes"),
                    hashlib.sha256(mask).hexdigest() if mask else None,
                ],
            ).encode()
        )
    return digest.hexdigest()


# --------------------------------------------------------------------------- generation


def condition_images(plan: Sequence[Mapping[str, Any]], size: int) -> np.ndarray:
    """Rendered ControlNet condition images ``(B, size, size)`` of planned rows."""
    from cxrfoundry.generate.controlnet import render_condition

    out = []
    for row in plan:
        mask = row.get("_mask")
        bits = imaging.decode_image(mask, name=f"{row['source_image_id']} mask") if mask else None
        source_size = tuple(row["_size"]) if row.get("_size") and row["_size"][0] else None
        out.append(
            render_condition(bits, row.get("boxes"), source_size=source_size, size=(size, size))
        )
    return np.stack(out)


def generate(
    pipe: Any,
    plan: Sequence[Mapping[str, Any]],
    *,
    num_inference_steps: int,
    batch_size: int = 32,
    controlnet: Any = None,
    conditioning_scale: float = 1.0,
    on_batch: Callable[[list[int], np.ndarray], None] | None = None,
    skip: Callable[[list[int]], bool] | None = None,
    progress: bool = True,
) -> np.ndarray | None:
    """Generate the planned images in batches; returns float ``(N, H, W)`` in [0, 1] unless
    ``on_batch(indices, images)`` consumes each batch (then ``None``).

    Each image's initial noise comes from its own ``seed``, so an image does not depend on the
    batch it is generated in; ``skip(indices)`` lets a resumed job jump over finished batches.
    All images of one call share the guidance scale of the first row.
    """
    import torch
    from tqdm.auto import tqdm

    if not plan:
        return None
    guidance = float(plan[0]["guidance"])
    if any(float(r["guidance"]) != guidance for r in plan):
        raise ValueError("generate: every planned image of one call must share the guidance")
    channels = pipe.transformer.config.in_channels
    size = pipe.transformer.config.sample_size
    pixels = size * pipe.latent_factor
    collected = []
    starts = range(0, len(plan), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=not progress):
        idx = list(range(start, min(start + batch_size, len(plan))))
        if skip is not None and skip(idx):
            continue
        rows = [plan[i] for i in idx]
        latents = torch.stack(
            [
                torch.randn(
                    (channels, size, size), generator=torch.Generator().manual_seed(r["seed"])
                )
                for r in rows
            ]
        )
        kwargs: dict[str, Any] = {}
        if controlnet is not None:
            kwargs = {
                "controlnet": controlnet,
                "control_image": condition_images(rows, pixels),
                "conditioning_scale": conditioning_scale,
            }
        images = pipe(
            [r["report"] for r in rows],
            latents=latents,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance,
            output_type="np",
            **kwargs,
        ).images
        if on_batch is not None:
            on_batch(idx, images)
        else:
            collected.append(images)
    return np.concatenate(collected) if collected else None


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- writing


def _writer_options(schema: pa.Schema) -> dict[str, Any]:
    """The shard writer's Parquet options (image bytes stored raw) over ``schema``."""
    other = [f.name for f in schema if f.name not in shards_lib.BINARY_COLUMNS]
    compression = {name: "zstd" for name in other}
    compression.update({name: "none" for name in shards_lib.BINARY_COLUMNS})
    return {
        "compression": compression,
        "use_dictionary": other,
        "write_statistics": other,
        "store_schema": True,
    }


def _add_synthetic_columns(
    staged: Path, out_dir: Path, plan: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]
) -> dict[str, Any]:
    """Copy the staged shards with the synthetic columns joined on, into ``out_dir``."""
    by_id = {r["image_id"]: r for r in plan}
    index = cio.read_json(staged / shards_lib.INDEX_NAME)
    row_group = int(index["params"]["row_group_size"])
    with cio.atomic_dir(out_dir) as tmp:
        for entry in index["shards"]:
            table = pq.read_table(staged / entry["file"])
            ids = table.column("image_id").to_pylist()
            for field in SYNTHETIC_FIELDS:
                values = [by_id[i][field.name] for i in ids]
                table = table.append_column(field, pa.array(values, field.type))
            table = table.cast(COHORT_SCHEMA)
            with cio.atomic_path(tmp / entry["file"]) as part:
                pq.write_table(
                    table, part, row_group_size=row_group, **_writer_options(COHORT_SCHEMA)
                )
            entry["bytes"] = (tmp / entry["file"]).stat().st_size
            entry["sha256"] = cio.sha256_file(tmp / entry["file"])
        shutil.copyfile(staged / shards_lib.REJECTS_NAME, tmp / shards_lib.REJECTS_NAME)
        index.update(
            {
                "cohort": meta["spec"]["name"],
                "synthetic": True,
                "schema": "cxrfoundry.schema.SHARD_SCHEMA + "
                + ", ".join(f.name for f in SYNTHETIC_FIELDS),
                **meta,
            }
        )
        cio.write_json(tmp / shards_lib.INDEX_NAME, index)
    return index


def write_cohort(
    plan: Sequence[Mapping[str, Any]],
    work_dir: Path,
    out_dir: Path,
    *,
    settings: Mapping[str, Any],
    seed: int,
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """Shard the generated PNGs in ``work_dir/images`` (and masks) into ``out_dir``.

    ``settings``: the corpus' ``shards`` settings (image size, encoding, row groups, shard
    size). Raises ``RuntimeError`` when an image could not be sharded (every planned image must
    be in the cohort).
    """
    rows = []
    for row in plan:
        out = {k: v for k, v in row.items() if not k.startswith("_")}
        if row.get("_mask"):
            out["mask_path"] = f"masks/{Path(row['image_path']).stem}.png"
        rows.append(out)
    table = conform(rows, REPORTS_SCHEMA)
    staged = work_dir / "staged"
    keys = shards_lib.SETTINGS_KEYS - {"equalize", "workers"}
    options = {k: v for k, v in settings.items() if k in keys}
    index = shards_lib.write_shards(
        [shards_lib.ShardSource(DATASET, table, work_dir)],
        staged,
        corpus=str(meta["spec"]["name"]),
        seed=seed,
        # Generated pixels already live in the corpus' pixel space: no second equalisation.
        equalize=False,
        workers=1,
        work_dir=work_dir / "shard_work",
        **options,
    )
    counts = index["counts"]
    if counts["rows_rejected"]:
        raise RuntimeError(
            f"cohort {meta['spec']['name']}: {counts['rows_rejected']} generated images could not "
            f"be sharded (see {staged / shards_lib.REJECTS_NAME})"
        )
    return _add_synthetic_columns(staged, Path(out_dir), plan, meta)


# --------------------------------------------------------------------------- the job


def synthesize_cohort(
    spec_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    schema: str | os.PathLike[str] | Mapping[str, Any],
    pipeline_dir: str | os.PathLike[str],
    shards_root: str | os.PathLike[str] = "results/shards",
    controlnet_dir: str | os.PathLike[str] | None = None,
    sampling: Mapping[str, Any],
    shard_settings: Mapping[str, Any],
    seed: int,
    image_size: int | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """The ``synthesize_cohort`` rule: spec → plan → images → cohort shards; returns the index.

    ``sampling``: ``num_inference_steps``, ``guidance_scale``, ``batch_size``,
    ``conditioning_scale`` (the spec may override the first two). ``image_size``: stored size
    (default the corpus' ``shards.image_size``, so cohorts stack with real shards).
    """
    import torch

    from cxrfoundry.generate.pipeline import ChexGenPipeline

    spec = load_spec(spec_path, schema)
    name = spec["name"]
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else out_dir.parent / ".work" / name
    sampling = sampling_settings(spec, sampling)
    source = None
    if spec["kind"] != "stratified":
        source = read_source(
            Path(shards_root) / spec["corpus"], spec["split"], with_masks=spec["controlnet"]
        )
    plan = plan_cohort(spec, source, seed=seed, guidance=float(sampling["guidance_scale"]))
    if not plan:
        raise ValueError(f"cohort {name!r}: the plan is empty (nothing to generate)")
    summary = plan_summary(plan)
    log.info("cohort %s (%s): %s", name, spec["kind"], summary)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = ChexGenPipeline.from_pretrained(pipeline_dir).to(device)
    controlnet = None
    models = {"pipeline": str(pipeline_dir), "pipeline_sha256": cio.sha256_tree(pipeline_dir)}
    if spec["controlnet"]:
        if controlnet_dir is None:
            raise ValueError(f"cohort {name!r} asks for a ControlNet but none was given")
        from cxrfoundry.generate.controlnet import ChexGenControlNet

        controlnet = ChexGenControlNet.from_pretrained(controlnet_dir).to(device).eval()
        models.update(
            {
                "controlnet": str(controlnet_dir),
                "controlnet_sha256": cio.sha256_tree(controlnet_dir),
            }
        )
    stamp = fingerprint(plan, {"sampling": sampling, **models})
    if (work / "plan.json").is_file() and cio.read_json(work / "plan.json").get("fp") != stamp:
        shutil.rmtree(work)  # images of another plan or model: none can be reused
    (work / "images").mkdir(parents=True, exist_ok=True)
    cio.write_json(work / "plan.json", {"fp": stamp, "summary": summary})
    if controlnet is not None:
        (work / "masks").mkdir(exist_ok=True)
        for row in plan:
            path = work / f"masks/{Path(row['image_path']).stem}.png"
            if row.get("_mask") and not path.is_file():
                cio.write_bytes(path, row["_mask"])

    def done(idx: list[int]) -> bool:
        return all((work / plan[i]["image_path"]).is_file() for i in idx)

    def save(idx: list[int], images: np.ndarray) -> None:
        for i, image in zip(idx, images, strict=True):
            cio.write_bytes(work / plan[i]["image_path"], imaging.encode_png(_to_uint8(image)))

    with torch.no_grad():
        generate(
            pipe,
            plan,
            num_inference_steps=int(sampling["num_inference_steps"]),
            batch_size=int(sampling.get("batch_size", 32)),
            controlnet=controlnet,
            conditioning_scale=float(sampling.get("conditioning_scale", 1.0)),
            on_batch=save,
            skip=done,
        )
    settings = dict(shard_settings)
    if image_size:
        settings["image_size"] = int(image_size)
    meta = {
        "spec": {k: v for k, v in spec.items()},
        "sampling": sampling,
        "models": models,
        "plan": summary,
        "generated_size": int(pipe.transformer.config.sample_size * pipe.latent_factor),
    }
    index = write_cohort(plan, work, out_dir, settings=settings, seed=seed, meta=meta)
    shutil.rmtree(work, ignore_errors=True)
    log.info("cohort %s: %d images in %s", name, index["counts"]["rows_written"], out_dir)
    return index
