"""ChexGen throughput: diffusion-transformer training samples/s from the feature cache, and
sampling images/s (DDIM + classifier-free guidance).

Training runs the real training step of ``cxrfoundry.train.diffusion`` (the same loss module,
caption dropout, AdamW, gradient clipping, EMA update, bf16 autocast on GPU) on latents and
text embeddings held in memory exactly as :func:`cxrfoundry.generate.features.load_features`
returns them — DiT-XL/2 at 256 px means 32×32×4 latents and, as in the paper, 120 T5 tokens of
4096 dims. FLOPs per step come from torch's FLOP counter; MFU is reported on GPU only (against
the bf16 peak table in ``cxrfoundry.train.engine``). Sampling runs the guided DDIM loop over
the transformer (the doubled CFG batch) and reports latents/s; VAE decoding is excluded (the
cluster VAE is a pretrained download and costs one pass per image, not per step).

Usage::

    .venv/bin/python bench/bench_ldm.py --preset XL/2 --steps 3 --batch 8 --json bench_ldm.json
    .venv/bin/python bench/bench_ldm.py --preset tiny --text-dim 384   # a quick CPU check
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from typing import Any

import pyarrow as pa
import torch

from cxrfoundry.generate import diffusion, dit
from cxrfoundry.generate.features import FeatureSet
from cxrfoundry.train import diffusion as tdiff
from cxrfoundry.train import engine

log = logging.getLogger("bench_ldm")


def synthetic_features(n: int, latent: int, text_dim: int, tokens: int, seed: int) -> FeatureSet:
    """A feature set shaped like the cache (fp32 latents, fp16 text, int8 masks)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, tokens, dtype=torch.int8)
    mask[:, tokens // 2 :] = 0  # reports are shorter than the padded length
    return FeatureSet(
        latents=torch.randn(n, 4, latent, latent, generator=g),
        text=torch.randn(n, tokens, text_dim, generator=g).half(),
        text_mask=mask,
        null_text=torch.zeros(1, tokens, text_dim).half(),
        null_mask=torch.cat([torch.ones(1, 1), torch.zeros(1, tokens - 1)], 1).to(torch.int8),
        rows=pa.table({"image_id": [str(i) for i in range(n)]}),
        index={"latent_shape": [4, latent, latent], "text_dim": text_dim, "max_tokens": tokens},
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run both measurements and return the result record."""
    dist = engine.init_distributed(args.device)
    engine.seed_everything(args.seed)
    feats = synthetic_features(
        max(args.batch * 4, 16), args.latent, args.text_dim, args.tokens, args.seed
    )
    cfg = {"preset": args.preset, "text_dim": args.text_dim, "latent_size": args.latent}
    model = dit.build_transformer(cfg).to(dist.device)
    params = sum(p.numel() for p in model.parameters())
    loop = tdiff.LoopConfig(
        steps=args.warmup + args.steps,
        batch_size=args.batch,
        precision=args.precision,
        checkpoint_every=10**9,
        log_every=10**9,
    )
    fn = tdiff._diffusion_fn(feats, device=dist.device, p_uncond=0.1, control=False)
    wrapped = tdiff.LossModule(model, fn)
    # The full training loop (FLOP count on its first step, EMA, clipping) runs first; it also
    # warms kernels and the allocator. Its wall time includes the counted step, so the steady
    # state is timed step by step below with the same loss module and optimiser step.
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = tdiff.run_training(
            model,
            lambda idx, g: wrapped(idx, g),
            num_samples=len(feats),
            loop=loop,
            checkpoint_dir=tmp,
            seed=args.seed,
            dist=dist,
        )
        wall = time.perf_counter() - t0
    tdiff.finish(result)
    history = result["history"]
    flops = result["flops_per_step"]
    step_times = []
    model.train()
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = engine.build_optimizer(model, lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999))
    autocast = engine.autocast_factory(dist.device, args.precision)
    for _ in range(args.steps):
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        idx = torch.randint(0, len(feats), (args.batch,), generator=gen)
        with autocast():
            loss = wrapped(idx, gen)
        loss.backward()
        tdiff.optimizer_step(model, opt, 1.0)
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t)
    step_s = sorted(step_times)[len(step_times) // 2]
    train_sps = args.batch / step_s
    peak = engine.peak_flops(dist.device)
    mfu = (flops / step_s) / peak if peak else None

    model.eval()
    text = feats.text[: args.sample_batch].float().to(dist.device)
    mask = feats.text_mask[: args.sample_batch].long().to(dist.device)

    def denoise(x, t, tx, m):
        with autocast():
            return dit.transformer_forward(model, x, t, tx, m).float()

    def sample() -> None:
        diffusion.ddim_sample(
            denoise,
            text,
            mask,
            feats.null_text.float().to(dist.device),
            feats.null_mask.long().to(dist.device),
            latent_shape=(4, args.latent, args.latent),
            scheduler=diffusion.sampling_scheduler(),
            num_steps=args.sample_steps,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
        )

    sample()  # warm-up (kernels, allocator)
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    sample()
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    sample_s = time.perf_counter() - t
    record = {
        "device": torch.cuda.get_device_name() if dist.device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "preset": args.preset,
        "parameters": params,
        "latent": [4, args.latent, args.latent],
        "text": [args.tokens, args.text_dim],
        "batch": args.batch,
        "precision": args.precision if dist.device.type == "cuda" else "fp32",
        "train_samples_per_s": train_sps,
        "train_step_s_median": step_s,
        "flops_per_step": flops,
        "achieved_flops_per_s": flops / step_s,
        "mfu": mfu,
        "loop_wall_s": wall,
        "loop_loss_first_last": [history[0]["loss"], history[-1]["loss"]],
        "sampling_steps": args.sample_steps,
        "sampling_batch": args.sample_batch,
        "sampling_images_per_s": args.sample_batch / sample_s,
        "sampling_s": sample_s,
    }
    return record


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the JSON record (and writes it with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="XL/2", choices=sorted(dit.PRESETS))
    parser.add_argument("--latent", type=int, default=32, help="latent side (256 px / 8)")
    parser.add_argument("--text-dim", type=int, default=4096, help="T5-XXL hidden size")
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (FLOP count)")
    parser.add_argument("--sample-steps", type=int, default=100)
    parser.add_argument("--sample-batch", type=int, default=4)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the record here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    record = run(args)
    text = json.dumps(record, indent=2, sort_keys=True)
    print(text)
    if args.json:
        from cxrfoundry.io import write_json

        write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
