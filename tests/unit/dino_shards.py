"""Tiny synthetic shards for the DINO tests (no dependency on the phantom generator).

Each image is a dark square with two bright "lung" ellipses and a "heart" disc whose radius is
larger when ``cardiomegaly`` is positive; ``pleural_effusion`` whitens the base of the right
lung. The ``mask`` column carries the lung/heart bits (``schema.MASK_BITS``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cxrfoundry import io as cio
from cxrfoundry.schema import FINDING_COLUMNS, MASK_BITS, SHARD_SCHEMA, conform


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run a test module's tiny models on one intra-op thread.

    Imported into each DINO test module (autouse). On a shared, loaded machine two OpenMP threads
    spin against each other on these tiny tensors: a 4-step training run takes ~10 s with two
    threads and ~0.7 s with one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_image(rng: np.random.Generator, size: int, cardio: bool, effusion: bool):
    """(image uint8, mask uint8) of one synthetic radiograph."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    lungs = np.zeros((size, size), dtype=bool)
    for cx in (0.3, 0.7):
        cx += rng.normal(0, 0.02)
        lungs |= ((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
    radius = (0.17 if cardio else 0.11) + rng.normal(0, 0.01)
    heart = ((xx - 0.55) ** 2 + (yy - 0.62) ** 2) < radius**2
    lungs &= ~heart
    image = 40 + 30 * rng.random((size, size))
    image[lungs] = 90 + 20 * rng.random(int(lungs.sum()))
    image[heart] = 200 + 20 * rng.random(int(heart.sum()))
    if effusion:
        image[lungs & (xx > 0.5) & (yy > 0.6)] = 210
    mask = lungs * MASK_BITS["lungs"] + heart * MASK_BITS["heart"]
    return image.clip(0, 255).astype(np.uint8), mask.astype(np.uint8)


def make_shards(root: Path, n: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """Write ``{split}-00000.parquet`` + ``index.json`` under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for split, count in n.items():
        rows = []
        for i in range(count):
            cardio, effusion = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
            image, mask = make_image(rng, size, cardio, effusion)
            labels = dict.fromkeys(FINDING_COLUMNS)
            labels["cardiomegaly"] = int(cardio)
            labels["pleural_effusion"] = int(effusion)
            labels["no_finding"] = int(not (cardio or effusion))
            rows.append(
                {
                    "image_id": f"toy/{split}{i}",
                    "dataset": "toy",
                    "patient_id": f"p{split}{i}",
                    "study_id": f"s{split}{i}",
                    "image_path": f"{split}{i}.png",
                    "view": "PA",
                    "view_source": "metadata",
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
        name = f"{split}-00000.parquet"
        pq.write_table(conform(rows, SHARD_SCHEMA), root / name, row_group_size=16)
        entries.append(
            {"file": name, "split": split, "rows": count, "sha256": cio.sha256_file(root / name)}
        )
    cio.write_json(root / "index.json", {"shards": entries})
    return root
