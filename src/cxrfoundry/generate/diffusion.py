"""Latent diffusion as in the ChexGen paper: training loss, classifier-free guidance, DDIM.

* Noise schedule: :class:`~diffusers.DDPMScheduler`, linear β from 1e-4 to 0.02 over 1000
  steps, epsilon prediction.
* Caption dropout: with probability ``p_uncond`` (10 %) a sample's text tokens are replaced
  by the null embedding (the frozen text encoder's encoding of the empty prompt), so one model
  learns both the conditional and the unconditional prediction.
* Classifier-free guidance: ``eps = eps_uncond + s · (eps_cond − eps_uncond)`` on the *whole*
  latent — every channel. (The released ChexGen code guides only 3 of the 4 channels and its
  ControlNet sampler ignores the scale; both are bugs we do not copy.) With a ControlNet the
  same control residuals enter both branches, so guidance works with control.
* Sampling: :class:`~diffusers.DDIMScheduler` on the same β schedule, 100 steps by default,
  η = 0 (deterministic given the initial noise, which comes from a seeded generator).

The model is any ``denoise(latents, t, text, text_mask) -> eps`` callable, so the same code
serves the bare transformer, the transformer with a ControlNet and the unit tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

#: denoise(latents, timesteps, text, text_mask) -> predicted noise.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: ChexGen's noise schedule (linear β over 1000 steps, epsilon prediction).
SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}


def train_scheduler(**overrides: Any) -> DDPMScheduler:
    """The training noise schedule (:data:`SCHEDULE`, ``overrides`` on top)."""
    return DDPMScheduler(**{**SCHEDULE, "clip_sample": False, **overrides})


def sampling_scheduler(**overrides: Any) -> DDIMScheduler:
    """DDIM on the training schedule. Latents are not clipped; the last step goes to ᾱ = 1
    only through the final ``alphas_cumprod[0]`` (``set_alpha_to_one=False``, as SD/PixArt)."""
    cfg = {**SCHEDULE, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    return DDIMScheduler(**{**cfg, **overrides})


# -- text -----------------------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_tokens: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings ``(B, max_tokens, D)`` and attention mask ``(B, max_tokens)`` of a frozen
    encoder (T5 on a cluster, MiniLM/BERT or the CLIP text tower in the demo).

    Every prompt is padded/truncated to ``max_tokens`` (120 in the paper) so cached features
    stack; the null prompt for caption dropout and guidance is ``""`` through this same path.
    """
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        truncation=True,
        max_length=max_tokens,
        return_tensors="pt",
    )
    ids = tokens["input_ids"].to(device)
    mask = tokens["attention_mask"].to(device)
    out = text_encoder(input_ids=ids, attention_mask=mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.float(), mask


# -- training -------------------------------------------------------------------------------
def drop_captions(
    text: torch.Tensor,
    mask: torch.Tensor,
    null_text: torch.Tensor,
    null_mask: torch.Tensor,
    p_uncond: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace each sample's text by the null embedding with probability ``p_uncond``.

    Returns ``(text, mask, dropped)`` with ``dropped`` a bool vector.
    """
    batch = text.shape[0]
    draw = torch.rand(batch, generator=generator, device=generator.device if generator else "cpu")
    dropped = (draw < p_uncond).to(text.device)
    keep = dropped.view(-1, *([1] * (text.ndim - 1)))
    text = torch.where(keep, null_text.to(text).expand_as(text), text)
    mask = torch.where(dropped.view(-1, 1), null_mask.to(mask).expand_as(mask), mask)
    return text, mask, dropped


def diffusion_loss(
    denoise: Denoiser,
    latents: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    scheduler: DDPMScheduler,
    null_text: torch.Tensor,
    null_mask: torch.Tensor,
    p_uncond: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The epsilon-prediction MSE at uniformly drawn timesteps, with caption dropout.

    All randomness (timesteps, noise, dropout) comes from ``generator`` (CPU) so a resumed run
    that restores it repeats the same draws.
    """
    batch = latents.shape[0]
    n_steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, n_steps, (batch,), generator=generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    text, text_mask, _ = drop_captions(text, text_mask, null_text, null_mask, p_uncond, generator)
    noisy = scheduler.add_noise(latents, noise, t)
    eps = denoise(noisy, t, text, text_mask)
    return torch.nn.functional.mse_loss(eps.float(), noise.float())


# -- guidance and sampling ------------------------------------------------------------------
def apply_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on every channel of the latent."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def guided_epsilon(
    denoise: Denoiser,
    latents: torch.Tensor,
    t: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    null_text: torch.Tensor,
    null_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Guided noise prediction; at ``scale == 1`` exactly the conditional prediction (one pass).

    The unconditional and conditional branches run as one doubled batch.
    """
    if scale == 1.0:
        return denoise(latents, t, text, text_mask)
    batch = latents.shape[0]
    null_text = null_text.to(text).expand(batch, *null_text.shape[1:])
    null_mask = null_mask.to(text_mask).expand(batch, *null_mask.shape[1:])
    eps = denoise(
        torch.cat([latents, latents]),
        torch.cat([t, t]) if t.ndim else t,
        torch.cat([null_text, text]),
        torch.cat([null_mask, text_mask]),
    )
    eps_uncond, eps_cond = eps.chunk(2)
    return apply_guidance(eps_uncond, eps_cond, scale)


@torch.no_grad()
def ddim_sample(
    denoise: Denoiser,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    null_text: torch.Tensor,
    null_mask: torch.Tensor,
    *,
    latent_shape: tuple[int, int, int],
    scheduler: DDIMScheduler,
    num_steps: int = 100,
    guidance_scale: float = 4.0,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample latents ``(B, *latent_shape)`` for a batch of text conditions with DDIM + CFG.

    The initial noise is drawn on the CPU from ``generator`` (so results do not depend on the
    device) unless ``latents`` is given. Returns the final (scaled) latents.
    """
    batch = text.shape[0]
    device = text.device
    if latents is None:
        latents = torch.randn((batch, *latent_shape), generator=generator)
    latents = latents.to(device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_steps, device=device)
    for t in tqdm(scheduler.timesteps, desc="DDIM", disable=not progress, leave=False):
        t_batch = t.expand(batch).to(device)
        eps = guided_epsilon(
            denoise, latents, t_batch, text, text_mask, null_text, null_mask, guidance_scale
        )
        latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
    return latents
