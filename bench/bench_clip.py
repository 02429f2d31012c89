"""CLIP training throughput for a ViT-B/16-sized image tower: samples/s, FLOPs, MFU (GPU).

Runs the real training step of :mod:`cxrfoundry.train.clip` — preprocessing, both towers,
gathered symmetric InfoNCE, backward (optionally GradCache), gradient clipping and AdamW — on
synthetic images and report-like token sequences (throughput does not depend on pixel values).
FLOPs per step come from ``torch.utils.flop_counter`` on one step; MFU = achieved FLOP/s ÷ the
device's dense bf16 peak (:data:`cxrfoundry.train.engine.PEAK_FLOPS_BF16`), GPU only. In the
same run it also times GradCache with ``--micro`` so its overhead is a ratio, not a guess.

Usage::

    .venv/bin/python bench/bench_clip.py                       # CPU: small batch, few steps
    python bench/bench_clip.py --batch 256 --steps 20 --micro 64 --json out.json   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from cxrfoundry.models.clip import CLIPModel
from cxrfoundry.models.losses import gathered_clip_loss
from cxrfoundry.train import engine
from cxrfoundry.train.gradcache import contrastive_backward

#: ViT-B/16 at 224 px (86 M parameters); MiniLM-L6 text tower, trained.
VIT_B16 = {
    "embed_dim": 512,
    "image": {
        "image_size": 224,
        "patch_size": 16,
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "mlp_ratio": 4,
        "num_channels": 3,
    },
    "text": {"pretrained": "minilm", "max_length": 128, "train_layers": -1},
}


def measure(
    model: CLIPModel,
    device: torch.device,
    *,
    batch: int,
    steps: int,
    micro: int | None,
    precision: str,
    text_len: int,
) -> dict[str, float | None]:
    """Time ``steps`` training steps after one FLOP-counted warm-up step."""
    optimizer = engine.build_optimizer(model, lr=1e-5, weight_decay=1e-4)
    autocast = engine.autocast_factory(device, precision)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 1, 224, 224), dtype=torch.uint8, generator=g)
    vocab = model.tokenizer.vocab_size
    ids = torch.randint(1000, vocab, (batch, text_len), generator=g)
    mask = torch.ones_like(ids)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        inputs = {
            "pixel_values": model.preprocess_images(images.to(device)),
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
        }
        contrastive_backward(
            model, inputs, gathered_clip_loss, micro_batch_size=micro, autocast=autocast
        )
        engine.clip_gradients(model, 1.0)
        optimizer.step()

    flops = engine.count_flops(step)
    step()  # a second warm-up: allocator, cuDNN/cuBLAS heuristics
    tp = engine.Throughput(device)
    for _ in range(steps):
        tp.start()
        step()
        tp.stop(batch, flops)
    return {"flops_per_step": float(flops), **tp.summary(), "seconds": tp.seconds}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and optionally write) a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--batch", type=int, default=256 if cuda else 8)
    parser.add_argument("--steps", type=int, default=20 if cuda else 3)
    parser.add_argument("--micro", type=int, default=64 if cuda else 4, help="GradCache size")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--text-len", type=int, default=96)
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = CLIPModel(VIT_B16).to(device).train()
    params = sum(p.numel() for p in model.vision.parameters())
    started = time.time()
    plain = measure(
        model,
        device,
        batch=args.batch,
        steps=args.steps,
        micro=None,
        precision=args.precision,
        text_len=args.text_len,
    )
    cached = measure(
        model,
        device,
        batch=args.batch,
        steps=args.steps,
        micro=args.micro,
        precision=args.precision,
        text_len=args.text_len,
    )
    summary = {
        "config": "ViT-B/16 224px + MiniLM-L6 (trained), embed 512",
        "image_tower_params": params,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "precision": args.precision if cuda else "fp32",
        "batch": args.batch,
        "steps": args.steps,
        "plain": plain,
        f"gradcache_micro{args.micro}": cached,
        "gradcache_speed_ratio": (
            cached["samples_per_s"] / plain["samples_per_s"]
            if plain["samples_per_s"] and cached["samples_per_s"]
            else None
        ),
        "wall_s": time.time() - started,
    }
    text = json.dumps(summary, indent=2, default=lambda x: None if x != x else x)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return 0 if plain["samples_per_s"] and math.isfinite(plain["samples_per_s"]) else 1


if __name__ == "__main__":
    sys.exit(main())
