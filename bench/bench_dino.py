"""DINO pretraining throughput: samples/s (and MFU on GPU) for ViT-S/14 and ViT-B/14.

Runs the real training loop (:func:`cxrfoundry.train.dino.train_dino`) for a few steps on
synthetic shards, with the CXformer recipe's crops (2 global at 518 px + 8 local at 98 px,
4 registers, 16,384 prototypes, EMA centering), and reads the loop's own accounting from
``metrics.json``: FLOPs per step (torch's FLOP counter on the first step), samples/s over the
timed steps (the first, counted step is excluded; data loading is not timed) and MFU against the
GPU's dense bf16 peak.

Usage::

    .venv/bin/python bench/bench_dino.py --json bench_dino.json            # GPU: full recipe
    .venv/bin/python bench/bench_dino.py --global-size 112 --local-size 42 --steps 2 --batch 2
                                                                          # quick CPU check
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from cxrfoundry import io as cio
from cxrfoundry.schema import SHARD_SCHEMA, conform
from cxrfoundry.train.dino import train_dino

ARCHS = {"vit_s14": "vit_small", "vit_b14": "vit_base"}


def synthetic_shards(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` random-texture grayscale PNGs in one train shard + index.json."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        base = rng.normal(120, 40, (size // 8, size // 8)).clip(0, 255).astype(np.uint8)
        image = np.asarray(Image.fromarray(base).resize((size, size), Image.BILINEAR))
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        rows.append(
            {
                "image_id": f"bench/{i}", "dataset": "bench", "patient_id": str(i),
                "study_id": str(i), "image_path": f"{i}.png", "view": "PA",
                "view_source": "metadata", "labels_extra": "{}", "split": "train",
                "report_source": "template", "qc_status": "pass", "qc_flags": "[]",
                "image": buffer.getvalue(), "height": size, "width": size,
            }
        )  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(conform(rows, SHARD_SCHEMA), root / "train-00000.parquet")
    sha = cio.sha256_file(root / "train-00000.parquet")
    entry = {"file": "train-00000.parquet", "split": "train", "rows": n, "sha256": sha}
    cio.write_json(root / "index.json", {"shards": [entry]})
    return root


def bench_one(name: str, args: argparse.Namespace, shards: Path, work: Path) -> dict:
    """Run ``args.steps`` (+1 counted) steps of one architecture; return its figures."""
    cfg = {
        "backbone": {"arch": ARCHS[name], "patch_size": 14, "num_register_tokens": 4},
        "augment": {
            "global_size": args.global_size,
            "local_size": args.local_size,
            "n_local": args.n_local,
        },
        "dino_head": {"n_prototypes": args.prototypes},
        "ibot_head": {"n_prototypes": args.prototypes},
        "batch_size": args.batch,
        "epochs": 1,
        "max_steps": args.steps + 1,
        "freeze_backbone_epochs": 0,
        "num_workers": args.workers,
        "keep_training_state": False,
        "log_every": 1,
        "checkpoint_every": 10**9,
        "diagnostics": {"n_images": 0},
    }
    started = time.time()
    metrics = train_dino(shards, work / name, cfg, seed=0, work_dir=work / f"{name}.work")
    return {
        "arch": name,
        "device": metrics["device"],
        "global_batch": args.batch,
        "crops": f"2x{args.global_size}+{args.n_local}x{args.local_size}",
        "timed_steps": args.steps,
        "samples_per_s": metrics["samples_per_s"],
        "flops_per_sample": metrics["flops_per_step"] / args.batch,
        "achieved_tflops": (metrics["flops_per_s"] or 0) / 1e12,
        "mfu": metrics["mfu"],
        "wall_s": time.time() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="vit_s14,vit_b14")
    parser.add_argument("--global-size", type=int, default=518)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--prototypes", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=None, help="default 32 on GPU, 2 on CPU")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1 counted)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    gpu = torch.cuda.is_available()
    args.batch = args.batch or (32 if gpu else 2)
    args.workers = args.workers if args.workers is not None else (8 if gpu else 0)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_dino.") as tmp:
        work = Path(tmp)
        shards = synthetic_shards(work / "shards", args.batch * (args.steps + 1), 512)
        for name in args.archs.split(","):
            result = bench_one(name, args, shards, work)
            results.append(result)
            mfu = "n/a (CPU)" if result["mfu"] is None else f"{result['mfu']:.1%}"
            print(
                f"{name}: {result['samples_per_s']:.3g} samples/s "
                f"({result['crops']}, batch {args.batch}, {result['device']}), "
                f"{result['flops_per_sample'] / 1e9:.1f} GFLOP/sample, MFU {mfu}"
            )
    if args.json:
        cio.write_json(args.json, {"results": results, "torch": torch.__version__})
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
