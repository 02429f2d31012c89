"""Tiny, learnable image-report shards for the CLIP tests (written with pyarrow + PIL only).

Each image is a dark 32 px square with optional bright blobs standing in for findings
(cardiomegaly: a large central disc; effusion: a bright lower band; pneumothorax: a dark upper
band). Reports name every finding positively or negatively, so zero-shot prompts are meaningful.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from cxrfoundry.schema import SHARD_SCHEMA, conform

FINDINGS = {
    "cardiomegaly": ("Cardiomegaly is present.", "No cardiomegaly."),
    "pleural_effusion": ("There is a pleural effusion.", "No pleural effusion."),
    "pneumothorax": ("There is a pneumothorax.", "No pneumothorax."),
}

#: A tiny model for tests: 32 px ViT, 1-layer random BERT with MiniLM's vocabulary.
TINY_MODEL = {
    "embed_dim": 16,
    "image": {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "num_channels": 1,
    },
    "text": {
        "pretrained": None,
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "max_length": 32,
    },
}


def _image(labels: dict[str, int], rng: np.random.Generator, size: int = 32) -> bytes:
    img = rng.normal(60, 10, (size, size))
    yy, xx = np.mgrid[:size, :size]
    if labels["cardiomegaly"]:
        img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] += 120
    if labels["pleural_effusion"]:
        img[int(size * 0.75) :, :] += 150
    if labels["pneumothorax"]:
        img[: int(size * 0.25), :] -= 50
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_tiny_shards(root: Path, n_train: int = 48, n_test: int = 40, seed: int = 0) -> Path:
    """Write ``root/{split}-00000.parquet`` + ``index.json`` and return ``root``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            labels = {k: int(rng.random() < 0.4) for k in FINDINGS}
            report = " ".join(FINDINGS[k][0 if v else 1] for k, v in labels.items())
            rows.append(
                {
                    "image_id": f"tiny/{split}{i:04d}",
                    "dataset": "tiny",
                    "patient_id": f"p{split}{i // 2}",
                    "study_id": f"s{split}{i}",
                    "image_path": f"{split}{i}.png",
                    "view": "PA",
                    "view_source": "metadata",
                    "labels_extra": "{}",
                    "report": report,
                    "split": split,
                    "report_source": "template",
                    "qc_status": "pass",
                    "qc_flags": "[]",
                    "image": _image(labels, rng),
                    "height": 32,
                    "width": 32,
                    "sex": "F" if i % 2 else "M",
                    "age": 50.0 + i % 30,
                    **labels,
                }
            )
        path = root / f"{split}-00000.parquet"
        pq.write_table(conform(rows, SHARD_SCHEMA), path, row_group_size=16)
        import hashlib

        entries.append(
            {
                "file": path.name,
                "split": split,
                "rows": n,
                "bytes": path.stat().st_size,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
    (root / "index.json").write_text(json.dumps({"corpus": "tiny", "shards": entries}))
    return root
