"""Tiny shards for the evaluation tests: patients with several images, demographics, and a
planted subgroup bias (no dependency on the phantom generator).

Each image is a dark square with two "lung" ellipses and a "heart" disc; ``cardiomegaly``
enlarges the heart by ``0.06 * signal`` (radius, image fractions) and ``pleural_effusion``
whitens the base of the right lung with contrast ``120 * signal``. ``signal`` is
``bias.get(sex, 1.0)``, so ``bias={"F": 0.2}`` makes findings faint in women. Files are
``{split}-00000.parquet`` with ``index.json``; with ``index=False`` (a synthetic cohort folder)
only the Parquet files are written.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from cxrfoundry import io as cio
from cxrfoundry.schema import FINDING_COLUMNS, MASK_BITS, SHARD_SCHEMA, conform

TINY_BACKBONE = {
    "arch": "vit_demo",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 8,
    "image_size": 32,
    "num_register_tokens": 0,
}
RACES = ("White", "Black", "Asian")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_image(rng: np.random.Generator, size: int, cardio: bool, effusion: bool, signal: float):
    """(image uint8, mask uint8) of one synthetic radiograph."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    lungs = np.zeros((size, size), dtype=bool)
    for cx in (0.3, 0.7):
        lungs |= ((xx - cx - rng.normal(0, 0.02)) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
    radius = 0.11 + (0.06 * signal if cardio else 0.0) + rng.normal(0, 0.012)
    heart = ((xx - 0.55) ** 2 + (yy - 0.62) ** 2) < radius**2
    lungs &= ~heart
    image = 40 + 30 * rng.random((size, size))
    image[lungs] = 90 + 20 * rng.random(int(lungs.sum()))
    image[heart] = 200 + 20 * rng.random(int(heart.sum()))
    if effusion:
        image[lungs & (xx > 0.5) & (yy > 0.6)] += 120 * signal
    mask = lungs * MASK_BITS["lungs"] + heart * MASK_BITS["heart"]
    return image.clip(0, 255).astype(np.uint8), mask.astype(np.uint8)


def make_rows(
    split: str,
    n_patients: int,
    *,
    images_per_patient: int = 2,
    size: int = 32,
    seed: int = 0,
    bias: Mapping[str, float] | None = None,
    female_fraction: float = 0.5,
    prefix: str = "toy",
    dataset: str = "toy",
) -> list[dict]:
    """Shard rows of ``n_patients`` patients (``images_per_patient`` each)."""
    rng = np.random.default_rng(seed)
    bias = dict(bias or {})
    rows = []
    for p in range(n_patients):
        sex = "F" if rng.random() < female_fraction else "M"
        age = float(rng.integers(20, 90))
        race = RACES[int(rng.integers(len(RACES)))]
        for k in range(images_per_patient):
            cardio, effusion = bool(rng.random() < 0.4), bool(rng.random() < 0.4)
            image, mask = make_image(rng, size, cardio, effusion, float(bias.get(sex, 1.0)))
            labels = dict.fromkeys(FINDING_COLUMNS)
            labels["cardiomegaly"] = int(cardio)
            labels["pleural_effusion"] = int(effusion)
            labels["no_finding"] = int(not (cardio or effusion))
            image_id = f"{prefix}/{split}{p}_{k}"
            rows.append(
                {
                    "image_id": image_id,
                    "dataset": dataset,
                    "patient_id": f"{prefix}{split}{p}",
                    "study_id": f"{image_id}s",
                    "image_path": f"{image_id}.png",
                    "view": "PA",
                    "view_source": "metadata",
                    "sex": sex,
                    "age": age,
                    "race": race,
                    "labels_extra": "{}",
                    "split": split,
                    "report_source": "template",
                    "qc_status": "pass",
                    "qc_flags": "[]",
                    "image": _png(image),
                    "height": size,
                    "width": size,
                    "mask": _png(mask),
                    **labels,
                }
            )
    return rows


def make_shards(
    root: Path,
    patients: Mapping[str, int],
    *,
    index: bool = True,
    seed: int = 0,
    **kwargs,
) -> Path:
    """Write one shard per split (``patients[split]`` patients) under ``root``; returns it."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (split, count) in enumerate(patients.items()):
        rows = make_rows(split, count, seed=seed * 100 + i, **kwargs)
        name = f"{split}-00000.parquet"
        pq.write_table(conform(rows, SHARD_SCHEMA), root / name)
        entries.append(
            {
                "file": name,
                "split": split,
                "rows": len(rows),
                "sha256": cio.sha256_file(root / name),
            }
        )
    if index:
        cio.write_json(root / "index.json", {"shards": entries})
    return root
