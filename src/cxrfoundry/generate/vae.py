"""The latent space: diffusers :class:`~diffusers.AutoencoderKL`.

On a cluster ChexGen uses a frozen Stable-Diffusion VAE (8× downsampling, 4 latent channels,
scaling factor 0.18215) loaded with ``from_pretrained``; in the demo a small VAE of the same
family is trained on the phantom images by ``pretrain_vae``. Radiographs are grayscale: they
are replicated to the VAE's input channels (3 for the SD VAE, 1 for the demo VAE) and the
decoded channels are averaged back.

Pixel convention everywhere in ``cxrfoundry.generate``: images are float ``(B, 1, H, W)`` in
[0, 1]; the VAE sees [-1, 1]; latents are multiplied by ``config.scaling_factor`` so the
diffusion model sees roughly unit variance (how SD's 0.18215 was chosen; for a trained demo
VAE we measure it, see :func:`fit_scaling_factor`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL

log = logging.getLogger(__name__)

#: The demo VAE (4× downsampling at two stages + identity, 4 latent channels, grayscale).
DEMO_VAE: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 4,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 16,
}


def build_vae(cfg: Mapping[str, Any]) -> AutoencoderKL:
    """A VAE: ``from_pretrained(cfg["pretrained"])`` (frozen on a cluster), or a fresh small
    one from ``cfg["arch"]`` merged over :data:`DEMO_VAE` (to be trained).

    ``pretrained`` may be a hub id on a cluster or a local folder; ``subfolder`` selects
    e.g. ``vae`` inside a whole Stable Diffusion repository.
    """
    if cfg.get("pretrained"):
        kwargs = {"subfolder": cfg["subfolder"]} if cfg.get("subfolder") else {}
        vae = AutoencoderKL.from_pretrained(cfg["pretrained"], **kwargs)
        log.info("VAE loaded from %s (scaling %.5f)", cfg["pretrained"], vae.config.scaling_factor)
        return vae
    arch = {**DEMO_VAE, **dict(cfg.get("arch") or {})}
    n = len(arch["block_out_channels"])
    arch.setdefault("down_block_types", ["DownEncoderBlock2D"] * n)
    arch.setdefault("up_block_types", ["UpDecoderBlock2D"] * n)
    return AutoencoderKL(**arch)


def downsample_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell along one side (8 for the SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def to_vae_input(images: torch.Tensor, vae: AutoencoderKL) -> torch.Tensor:
    """[0, 1] grayscale ``(B, 1, H, W)`` → [-1, 1] with the VAE's input channel count."""
    x = images * 2.0 - 1.0
    channels = vae.config.in_channels
    return x.expand(-1, channels, -1, -1) if channels != x.shape[1] else x


def from_vae_output(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] (any channels) → grayscale ``(B, 1, H, W)`` in [0, 1]."""
    return ((decoded.mean(dim=1, keepdim=True) + 1.0) / 2.0).clamp(0.0, 1.0)


@torch.no_grad()
def encode(
    vae: AutoencoderKL, images: torch.Tensor, *, sample: bool = False, generator=None
) -> torch.Tensor:
    """Scaled latents of [0, 1] images (posterior mean unless ``sample``)."""
    dist = vae.encode(to_vae_input(images, vae)).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return z * vae.config.scaling_factor


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """[0, 1] grayscale images from scaled latents."""
    return from_vae_output(vae.decode(latents / vae.config.scaling_factor).sample)


@torch.no_grad()
def fit_scaling_factor(vae: AutoencoderKL, batches: Iterable[torch.Tensor]) -> float:
    """1 / std of the unscaled posterior means over ``batches`` of [0, 1] images."""
    total, total_sq, n = 0.0, 0.0, 0
    for images in batches:
        z = vae.encode(to_vae_input(images, vae)).latent_dist.mean.double()
        total += float(z.sum())
        total_sq += float((z * z).sum())
        n += z.numel()
    if n == 0:
        raise ValueError("fit_scaling_factor: no images")
    var = total_sq / n - (total / n) ** 2
    return float(1.0 / max(var, 1e-12) ** 0.5)


def vae_loss(
    vae: AutoencoderKL, images: torch.Tensor, *, kl_weight: float, generator=None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction (L1 + MSE) + ``kl_weight`` × KL on [0, 1] images; returns (loss, parts).

    This is the VAE objective without LDM's adversarial and perceptual terms (a GAN adds cost
    and instability that a demo cannot afford); on a cluster the pretrained VAE is frozen.
    """
    x = to_vae_input(images, vae)
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    l1 = (recon - x).abs().mean()
    mse = ((recon - x) ** 2).mean()
    kl = posterior.kl().mean() / x[0].numel()
    loss = l1 + mse + kl_weight * kl
    parts = {"l1": float(l1.detach()), "mse": float(mse.detach()), "kl": float(kl.detach())}
    return loss, parts


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """PSNR (dB) of [0, 1] images with torchmetrics (data range 1)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(reconstruction, reference, data_range=1.0))
