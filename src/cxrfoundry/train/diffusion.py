"""Training entry points of ChexGen: VAE, latent diffusion (stage I / II) and ControlNet.

All three share :func:`run_training`: AdamW (paper: lr 1e-4, wd 0.01, betas 0.9/0.999), linear
warm-up then constant lr (``min_lr_ratio`` < 1 adds a cosine decay), gradient clipping that is
actually applied (1.0; the released ChexGen code computes the norm but never clips), EMA
weights (diffusers ``EMAModel``), bf16 autocast on GPU, DDP under torchrun, FLOP accounting
(one step measured with torch's FLOP counter) and exact resume.

Exact resume without a sampler: every random draw of a step (batch indices, timesteps, noise,
caption dropout, VAE posterior samples) comes from one CPU generator seeded from the config.
Under DDP every rank draws the *global* batch with the same generator and keeps its slice, so
all ranks' generators stay identical and rank 0's checkpoint (model, optimiser, scheduler,
EMA, generator state) resumes every rank bit-identically.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrfoundry import io as cio
from cxrfoundry.train import engine
from cxrfoundry.train.checkpoint import CheckpointManager, StopSignal

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    """Optimisation settings shared by every ChexGen training job (config keys, same names)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    ema_decay: float | None = 0.9999
    ema_warmup: bool = True
    precision: str = "bf16"
    checkpoint_every: int = 500
    log_every: int = 50

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> LoopConfig:
        """Build from a config block, ignoring keys that are not loop settings."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in cfg.items() if k in names}
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        loop = cls(**values)
        if loop.steps < 1 or loop.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive: {loop}")
        return loop


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None
) -> float:
    """Clip the global gradient norm to ``grad_clip`` (when set), step, zero the gradients.

    Returns the norm before clipping.
    """
    norm = engine.clip_gradients(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


LossFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def run_training(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    num_samples: int,
    loop: LoopConfig,
    checkpoint_dir: str | os.PathLike[str],
    seed: int,
    dist: engine.DistInfo,
    ema_target: nn.Module | None = None,
    forward_model: nn.Module | None = None,
) -> dict[str, Any]:
    """Train the trainable parameters of ``model`` for ``loop.steps`` steps.

    ``loss_fn(indices, generator)`` computes the loss of the samples ``indices`` (this rank's
    slice of the global batch) through ``forward_model`` (a DDP wrapper under torchrun, else
    ``model``) drawing any randomness from ``generator``. ``ema_target`` (default ``model``)
    receives EMA weights at the end when ``loop.ema_decay`` is set. Returns metrics; the
    trained weights are in ``model`` (and EMA weights in ``ema_target``).
    """
    if loop.batch_size % dist.world_size:
        raise ValueError(f"batch_size {loop.batch_size} not divisible by {dist.world_size} ranks")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("run_training: the model has no trainable parameters")
    optimizer = engine.build_optimizer(
        model, lr=loop.lr, weight_decay=loop.weight_decay, betas=loop.betas, eps=1e-8
    )
    scheduler = engine.cosine_schedule(
        optimizer,
        warmup_steps=loop.warmup_steps,
        total_steps=loop.steps,
        min_lr_ratio=loop.min_lr_ratio,
    )
    ema = None
    if loop.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=loop.ema_decay, use_ema_warmup=loop.ema_warmup)
    ckpts = CheckpointManager(checkpoint_dir, every_steps=loop.checkpoint_every, rank=dist.rank)
    generator = torch.Generator().manual_seed(int(seed))
    history: list[dict[str, float]] = []
    start = 0
    flops_per_step = 0.0
    state = ckpts.resume(model, optimizer, scheduler)
    if state is not None:
        start = state.step
        generator.set_state(state.extra["generator"])
        if ema is not None:
            ema.load_state_dict(state.extra["ema"])
        history = list(state.extra.get("history", []))
        flops_per_step = float(state.extra.get("flops_per_step", 0.0))
    forward_model = forward_model or model
    autocast = engine.autocast_factory(dist.device, loop.precision)
    throughput = engine.Throughput(dist.device, dist.world_size)
    model.train()

    def one_step() -> torch.Tensor:
        idx = torch.randint(0, num_samples, (loop.batch_size,), generator=generator)
        with autocast():
            loss = loss_fn(idx[dist.rank :: dist.world_size], generator)
        loss.backward()
        return loss

    def save(step: int) -> None:
        extra = {
            "generator": generator.get_state(),
            "ema": ema.state_dict() if ema is not None else None,
            "history": history,
            "flops_per_step": flops_per_step,
        }
        ckpts.save(step=step, model=model, optimizer=optimizer, scheduler=scheduler, extra=extra)

    with StopSignal() as stop:
        for step in range(start, loop.steps):
            throughput.start()
            if step == start and flops_per_step == 0.0:
                # Counting runs the real step once under the FLOP counter (same numerics).
                holder: dict[str, torch.Tensor] = {}
                flops_per_step = engine.count_flops(lambda h=holder: h.update(loss=one_step()))
                flops_per_step *= dist.world_size
                loss = holder["loss"]
            else:
                loss = one_step()
            norm = optimizer_step(model, optimizer, loop.grad_clip)
            scheduler.step()
            if ema is not None:
                ema.step(params)
            throughput.stop(loop.batch_size, flops_per_step)
            value = float(loss.detach())
            if engine.any_rank(not torch.isfinite(loss).item(), dist.device):
                raise FloatingPointError(f"loss is not finite at step {step + 1}")
            history.append({"step": step + 1, "loss": value, "grad_norm": norm})
            if (step + 1) % loop.log_every == 0 or step + 1 == loop.steps:
                log.info("step %d/%d loss %.4f grad_norm %.3f", step + 1, loop.steps, value, norm)
            stopping = engine.any_rank(stop.requested, dist.device)
            if (ckpts.due(step + 1) and step + 1 < loop.steps) or stopping:
                save(step + 1)
            if stopping:
                stop.exit()
    if ema is not None:
        target = params
        if ema_target is not None:
            target = [p for p in ema_target.parameters() if p.requires_grad]
        ema.copy_to(target)
    tp = throughput.summary()
    window = history[-max(1, len(history) // 10) :]
    return {
        "steps": loop.steps,
        "resumed_from": start,
        "final_loss": sum(h["loss"] for h in window) / len(window),
        "first_loss": history[0]["loss"] if history else None,
        "flops_per_step": flops_per_step,
        "total_flops": flops_per_step * loop.steps,
        **{k: v for k, v in tp.items()},
        "history": history,
        "_checkpoints": ckpts,
    }


def finish(metrics: dict[str, Any]) -> dict[str, Any]:
    """Delete the checkpoints of a finished run and return JSON-ready metrics."""
    ckpts = metrics.pop("_checkpoints", None)
    if ckpts is not None:
        ckpts.clear()
    return metrics


@contextlib.contextmanager
def _ddp(module: nn.Module, dist: engine.DistInfo):
    """``module`` wrapped in DDP when distributed (only trainable parameters are synced)."""
    if not dist.distributed:
        yield module
        return
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.local_rank] if dist.device.type == "cuda" else None
    yield DistributedDataParallel(module, device_ids=ids)


def ema_copy(model: nn.Module) -> nn.Module:
    """A deep copy to receive EMA weights (the raw weights stay in ``model``)."""
    return copy.deepcopy(model)


def write_metrics(out_dir: Path, metrics: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """``metrics.json`` and ``train_config.json`` (the resolved config) of a model folder."""
    cio.write_json(out_dir / "metrics.json", dict(metrics))
    cio.write_json(out_dir / "train_config.json", dict(config))


class LossModule(nn.Module):
    """Wraps ``model`` so that a loss computed through its methods runs inside ``forward``
    (DDP synchronises gradients only for computation that goes through the wrapped forward)."""

    def __init__(self, model: nn.Module, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.fn(self.model, *args, **kwargs)


def default_checkpoint_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Checkpoints live beside (not inside) the output folder: Snakemake deletes the outputs
    of a failed job before retrying it, and the retry must find them."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.ckpt"


# -- data ------------------------------------------------------------------------------------
def load_images(
    shards_dir: str | os.PathLike[str],
    split: str,
    *,
    image_size: int,
    max_rows: int | None = None,
    with_conditions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images of a split as ``(N, 1, S, S)`` float in [0, 1] (and rendered condition images).

    For the demo VAE, which trains from memory; unreadable rows raise naming the image.
    """
    import numpy as np
    import pyarrow.parquet as pq

    from cxrfoundry.data import imaging
    from cxrfoundry.data.dataset import list_shards
    from cxrfoundry.generate import controlnet as cn
    from cxrfoundry.generate.features import _resize

    images, conds = [], []
    for path in list_shards(shards_dir, split):
        table = pq.read_table(path, columns=["image_id", "image", "mask", "boxes"])
        for row in table.to_pylist():
            if max_rows is not None and len(images) >= max_rows:
                break
            px = imaging.decode_image(row["image"], name=row["image_id"])
            img = torch.from_numpy(px.astype(np.float32) / np.iinfo(px.dtype).max)[None, None]
            images.append(_resize(img, image_size)[0])
            if with_conditions and (row["mask"] is not None or row["boxes"]):
                bits = (
                    imaging.decode_image(row["mask"], name=f"{row['image_id']} mask")
                    if row["mask"] is not None
                    else None
                )
                cond = cn.render_condition(
                    bits, row["boxes"], source_size=px.shape, size=(image_size, image_size)
                )
                conds.append(torch.from_numpy(cond)[None])
    if not images:
        raise ValueError(f"{shards_dir}: no {split} images")
    return torch.stack(images), (torch.stack(conds) if conds else None)


# -- VAE ---------------------------------------------------------------------------------------
def train_vae(
    shards_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: Mapping[str, Any],
    *,
    seed: int,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train the demo VAE (or load the pretrained one) and save it with ``save_pretrained``.

    ``cfg`` (the ``chexgen.vae`` block): ``pretrained`` (hub id / folder: no training),
    ``arch`` (AutoencoderKL overrides), ``image_size``, ``kl_weight`` (1e-6),
    ``include_conditions`` (also reconstruct rendered mask/box images, which the ControlNet
    encodes with the same VAE), ``max_train_images``, ``eval_split`` (test) and the
    :class:`LoopConfig` keys. Writes ``out_dir`` (diffusers layout + ``metrics.json``) and
    returns the metrics, including reconstruction PSNR on the eval split.
    """
    from cxrfoundry.generate import vae as vae_lib

    dist = engine.init_distributed(cfg.get("device", "auto"))
    engine.seed_everything(seed)
    out_dir = Path(out_dir)
    size = int(cfg.get("image_size", 64))
    vae = vae_lib.build_vae(cfg).to(dist.device)
    metrics: dict[str, Any] = {"image_size": size, "pretrained": bool(cfg.get("pretrained"))}
    train_images, conds = load_images(
        shards_dir,
        "train",
        image_size=size,
        max_rows=cfg.get("max_train_images"),
        with_conditions=bool(cfg.get("include_conditions", True)),
    )
    if not cfg.get("pretrained"):
        data = train_images if conds is None else torch.cat([train_images, conds])
        loop = LoopConfig.from_config({"ema_decay": None, **cfg})
        kl_weight = float(cfg.get("kl_weight", 1e-6))

        def fn(model: nn.Module, batch: torch.Tensor, generator: torch.Generator):
            return vae_lib.vae_loss(model, batch, kl_weight=kl_weight, generator=generator)[0]

        with _ddp(LossModule(vae, fn), dist) as fwd:
            result = run_training(
                vae,
                lambda idx, g: fwd(data[idx].to(dist.device), g),
                num_samples=len(data),
                loop=loop,
                checkpoint_dir=checkpoint_dir or default_checkpoint_dir(out_dir),
                seed=seed,
                dist=dist,
            )
        metrics.update({k: v for k, v in result.items() if k != "history"})
        metrics["loss_history"] = [h["loss"] for h in result["history"]]
        metrics["train_images"] = len(train_images)
        metrics["condition_images"] = 0 if conds is None else len(conds)
        vae.eval()
        batches = [train_images[i : i + 64].to(dist.device) for i in range(0, 512, 64)]
        scaling = vae_lib.fit_scaling_factor(vae, [b for b in batches if len(b)])
        vae.register_to_config(scaling_factor=scaling)
    vae.eval().requires_grad_(False)
    metrics["scaling_factor"] = float(vae.config.scaling_factor)
    eval_images, _ = load_images(
        shards_dir,
        cfg.get("eval_split", "test"),
        image_size=size,
        max_rows=int(cfg.get("eval_images", 64)),
    )
    with torch.no_grad():
        eval_images = eval_images.to(dist.device)
        recon = vae_lib.decode(vae, vae_lib.encode(vae, eval_images))
    metrics["psnr"] = vae_lib.psnr(eval_images.cpu(), recon.cpu())
    metrics["eval_images"] = len(eval_images)
    log.info("VAE reconstruction PSNR %.2f dB on %d images", metrics["psnr"], len(eval_images))
    if dist.is_main:
        with cio.atomic_dir(out_dir) as tmp:
            vae.save_pretrained(tmp)
            write_metrics(tmp, finish(metrics), cfg)
    engine.barrier()
    return metrics


# -- latent diffusion --------------------------------------------------------------------------
def _diffusion_fn(features: Any, *, device: torch.device, p_uncond: float, control: bool):
    from cxrfoundry.generate import controlnet as cn
    from cxrfoundry.generate import diffusion

    scheduler = diffusion.train_scheduler()
    null_text = features.null_text.float().to(device)
    null_mask = features.null_mask.long().to(device)

    def fn(model: nn.Module, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        latents = features.latents[idx].float().to(device)
        text = features.text[idx].float().to(device)
        mask = features.text_mask[idx].long().to(device)
        if control:
            cond = features.control[idx].float().to(device)
            denoise = cn.control_denoiser(model["base"], model["control"], cond)
        else:
            from cxrfoundry.generate import dit

            def denoise(x, t, tx, m):
                return dit.transformer_forward(model, x, t, tx, m)

        return diffusion.diffusion_loss(
            denoise,
            latents,
            text,
            mask,
            scheduler=scheduler,
            null_text=null_text,
            null_mask=null_mask,
            p_uncond=p_uncond,
            generator=generator,
        )

    return fn


def _pipeline(transformer: nn.Module, vae_dir: str | os.PathLike[str], features: Any):
    from diffusers import AutoencoderKL

    from cxrfoundry.generate import diffusion
    from cxrfoundry.generate.features import load_text_encoder
    from cxrfoundry.generate.pipeline import ChexGenPipeline

    text_encoder, tokenizer = load_text_encoder(features.index["text_encoder"])
    return ChexGenPipeline(
        transformer=transformer.eval(),
        vae=AutoencoderKL.from_pretrained(vae_dir).eval(),
        scheduler=diffusion.sampling_scheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        max_tokens=features.index["max_tokens"],
        prompt_sections=features.index.get("sections"),
    )


def train_ldm(
    features_dirs: str | os.PathLike[str] | list[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    cfg: Mapping[str, Any],
    *,
    vae_dir: str | os.PathLike[str],
    seed: int,
    init_from: str | os.PathLike[str] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train the diffusion transformer on cached features and save a :class:`ChexGenPipeline`.

    Stage I: fresh transformer from ``cfg["model"]`` (preset etc.). Stage II: ``init_from`` a
    stage-I pipeline folder (its EMA transformer), on higher-resolution features of the curated
    subset. ``cfg`` also holds ``p_uncond`` (0.1) and :class:`LoopConfig` keys. The saved
    transformer holds the EMA weights. Returns the metrics (also in ``metrics.json``).
    """
    from diffusers import PixArtTransformer2DModel

    from cxrfoundry.generate import dit
    from cxrfoundry.generate.features import load_features

    dist = engine.init_distributed(cfg.get("device", "auto"))
    engine.seed_everything(seed)
    out_dir = Path(out_dir)
    features = load_features(features_dirs)
    channels, size, _ = features.index["latent_shape"]
    if init_from:
        model = PixArtTransformer2DModel.from_pretrained(init_from, subfolder="transformer")
        old = int(model.config.sample_size)
        if old != size:
            # Larger latents (stage II): as in PixArt, the sin-cos grid is stretched over the
            # same extent (interpolation_scale grows with the size), so the positions the
            # transformer learned keep their meaning, and the saved pipeline samples at `size`.
            scale = float(model.config.interpolation_scale or 1) * size / old
            model = PixArtTransformer2DModel.from_pretrained(
                init_from, subfolder="transformer", sample_size=size, interpolation_scale=scale
            )
            log.info("stage II: latent size %d -> %d, interpolation_scale %.3g", old, size, scale)
    else:
        model_cfg = {
            **dict(cfg.get("model") or {}),
            "text_dim": features.index["text_dim"],
            "latent_size": size,
            "latent_channels": channels,
        }
        model = dit.build_transformer(model_cfg)
    model = model.to(dist.device)
    if torch.cuda.is_available() and cfg.get("gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    loop = LoopConfig.from_config(cfg)
    fn = _diffusion_fn(
        features, device=dist.device, p_uncond=float(cfg.get("p_uncond", 0.1)), control=False
    )
    ema_model = ema_copy(model)
    with _ddp(LossModule(model, fn), dist) as fwd:
        result = run_training(
            model,
            lambda idx, g: fwd(idx, g),
            num_samples=len(features),
            loop=loop,
            checkpoint_dir=checkpoint_dir or default_checkpoint_dir(out_dir),
            seed=seed,
            dist=dist,
            ema_target=ema_model if loop.ema_decay else None,
        )
    final = ema_model if loop.ema_decay else model
    metrics = {k: v for k, v in result.items() if k != "history"}
    metrics.update(
        {
            "loss_history": [h["loss"] for h in result["history"]],
            "train_samples": len(features),
            "latent_shape": features.index["latent_shape"],
            "image_size": features.index["image_size"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "init_from": str(init_from) if init_from else None,
        }
    )
    if dist.is_main:
        pipe = _pipeline(final.cpu(), vae_dir, features)
        with cio.atomic_dir(out_dir) as tmp:
            pipe.save_pretrained(tmp)
            write_metrics(tmp, finish(metrics), cfg)
    engine.barrier()
    return metrics


def train_controlnet(
    features_dirs: str | os.PathLike[str] | list[str | os.PathLike[str]],
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: Mapping[str, Any],
    *,
    seed: int,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train a ControlNet on features with ``control`` latents against a frozen base pipeline.

    ``cfg``: ``num_layers`` (default half the base blocks), ``p_uncond`` and :class:`LoopConfig`
    keys. Saves the ControlNet (EMA weights) with ``save_pretrained`` in ``out_dir``.
    """
    from cxrfoundry.generate.controlnet import ChexGenControlNet
    from cxrfoundry.generate.features import load_features
    from cxrfoundry.generate.pipeline import ChexGenPipeline

    dist = engine.init_distributed(cfg.get("device", "auto"))
    engine.seed_everything(seed)
    out_dir = Path(out_dir)
    features = load_features(features_dirs)
    if features.control is None:
        raise ValueError(f"{features_dirs}: features have no control latents (with_control)")
    base = ChexGenPipeline.from_pretrained(base_dir).transformer.to(dist.device)
    base.requires_grad_(False).eval()
    net = ChexGenControlNet.from_transformer(base, num_layers=cfg.get("num_layers")).to(dist.device)
    both = nn.ModuleDict({"base": base, "control": net})
    loop = LoopConfig.from_config(cfg)
    fn = _diffusion_fn(
        features, device=dist.device, p_uncond=float(cfg.get("p_uncond", 0.1)), control=True
    )
    ema_net = ema_copy(net)
    with _ddp(LossModule(both, fn), dist) as fwd:
        result = run_training(
            both,
            lambda idx, g: fwd(idx, g),
            num_samples=len(features),
            loop=loop,
            checkpoint_dir=checkpoint_dir or default_checkpoint_dir(out_dir),
            seed=seed,
            dist=dist,
            ema_target=ema_net if loop.ema_decay else None,
        )
    final = ema_net if loop.ema_decay else net
    metrics = {k: v for k, v in result.items() if k != "history"}
    metrics["loss_history"] = [h["loss"] for h in result["history"]]
    metrics["train_samples"] = len(features)
    metrics["control_layers"] = len(net.blocks)
    if dist.is_main:
        with cio.atomic_dir(out_dir) as tmp:
            final.cpu().save_pretrained(tmp)
            write_metrics(tmp, finish(metrics), cfg)
    engine.barrier()
    return metrics


# -- entry points ------------------------------------------------------------------------------
JOBS: dict[str, Callable[..., dict[str, Any]]] = {
    "vae": train_vae,
    "ldm": train_ldm,
    "controlnet": train_controlnet,
}


def run_job(kind: str, *, gpus: int = 0, nodes: int = 1, **kwargs: Any) -> dict[str, Any]:
    """A rule's entry: ``JOBS[kind](**kwargs)`` in-process for 0–1 GPU on one node, else the
    same job under ``torchrun`` (or ``srun … torchrun``) via :mod:`cxrfoundry.train.launch`,
    returning the ``metrics.json`` it wrote. ``kwargs`` must be JSON-serialisable (paths are
    turned into strings). A pre-empted child exits non-zero, so the job fails and its retry
    resumes from the checkpoint."""
    if kind not in JOBS:
        raise ValueError(f"unknown ChexGen job {kind!r}; choose from {sorted(JOBS)}")
    if gpus <= 1 and nodes <= 1:
        return JOBS[kind](**kwargs)
    import subprocess

    from cxrfoundry.train.launch import build_command

    out_dir = Path(kwargs["out_dir"])
    spec = out_dir.parent / f".{out_dir.name}.launch.json"
    plain = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in kwargs.items()}
    cio.write_json(spec, {"kind": kind, "kwargs": plain})
    plan = build_command(["-m", "cxrfoundry.train.diffusion", str(spec)], gpus=gpus, nodes=nodes)
    log.info("launching: %s", plan.shell())
    proc = subprocess.run(plan.command, check=False)
    metrics_path = out_dir / "metrics.json"
    if proc.returncode != 0 or not metrics_path.is_file():
        raise RuntimeError(f"distributed {kind} training exited {proc.returncode}: {plan.shell()}")
    return cio.read_json(metrics_path)


def main(argv: list[str] | None = None) -> int:
    """``python -m cxrfoundry.train.diffusion SPEC.json`` (what :func:`run_job` launches)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cxrfoundry.train.diffusion SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec = cio.read_json(args[0])
    JOBS[spec["kind"]](**spec["kwargs"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
