"""The ChexGen diffusion transformer: diffusers' PixArt-α transformer, sized tiny → XL/2.

ChexGen's backbone is DiT-XL/2-like (28 blocks, hidden 1152, 16 heads, patch 2) with
self-attention, cross-attention to the text tokens and adaLN-single timestep conditioning —
exactly diffusers' :class:`~diffusers.PixArtTransformer2DModel`. We predict epsilon only, so the
output has as many channels as the latent (no learned variance), and PixArt's resolution /
aspect-ratio micro-conditions are off (one aspect ratio).

:func:`transformer_forward` re-implements the model's forward in three steps
(:func:`embed_inputs`, the blocks, :func:`final_layer`) so that a ControlNet can add a residual
after each block; with no residuals it equals ``model(...).sample`` (tested).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import PixArtTransformer2DModel

log = logging.getLogger(__name__)

#: (blocks, hidden size, heads, patch size); XL/2 is ChexGen's / DiT's largest configuration.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 64, 2, 2),
    "small-demo": (4, 128, 4, 2),
    "S/2": (12, 384, 6, 2),
    "B/2": (12, 768, 12, 2),
    "L/2": (24, 1024, 16, 2),
    "XL/2": (28, 1152, 16, 2),
}


def transformer_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers config of the transformer from a ChexGen model block.

    Keys: ``preset`` (one of :data:`PRESETS`, default ``tiny``), optional overrides
    ``num_layers``, ``hidden_size``, ``num_heads``, ``patch_size``; ``latent_channels``
    (default 4), ``latent_size`` (latent side, default 32 = 256 px / 8) and ``text_dim``
    (the text encoder's hidden size, required).
    """
    preset = cfg.get("preset", "tiny")
    if preset not in PRESETS:
        raise ValueError(f"unknown transformer preset {preset!r}; choose from {sorted(PRESETS)}")
    layers, hidden, heads, patch = PRESETS[preset]
    layers = int(cfg.get("num_layers", layers))
    hidden = int(cfg.get("hidden_size", hidden))
    heads = int(cfg.get("num_heads", heads))
    patch = int(cfg.get("patch_size", patch))
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {heads}")
    if "text_dim" not in cfg:
        raise ValueError("transformer config needs text_dim (the text encoder's hidden size)")
    latent_size = int(cfg.get("latent_size", 32))
    if latent_size % patch:
        raise ValueError(f"latent_size {latent_size} is not divisible by patch_size {patch}")
    channels = int(cfg.get("latent_channels", 4))
    return {
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": channels,
        "out_channels": channels,  # epsilon only
        "num_layers": layers,
        "cross_attention_dim": hidden,
        "sample_size": latent_size,
        "patch_size": patch,
        "caption_channels": int(cfg["text_dim"]),
        "use_additional_conditions": False,
        "norm_type": "ada_norm_single",
        "num_embeds_ada_norm": 1000,
        # Sin-cos positions are computed for the run's latent size; 1 keeps the frequency grid
        # of the pretrained resolution when stage II moves to larger latents.
        "interpolation_scale": int(cfg.get("interpolation_scale", 1)),
    }


def build_transformer(cfg: Mapping[str, Any]) -> PixArtTransformer2DModel:
    """A freshly initialised transformer (see :func:`transformer_config` for ``cfg``).

    As in DiT / PixArt the output projection starts at zero, so the initial noise prediction
    is zero and early training is stable.
    """
    model = PixArtTransformer2DModel(**transformer_config(cfg))
    torch.nn.init.zeros_(model.proj_out.weight)
    torch.nn.init.zeros_(model.proj_out.bias)
    n = sum(p.numel() for p in model.parameters())
    log.info("transformer %s: %.1f M parameters", cfg.get("preset", "tiny"), n / 1e6)
    return model


@dataclass
class Embedded:
    """Inputs of the transformer blocks (what a ControlNet shares with the base model)."""

    hidden: torch.Tensor  # (B, tokens, hidden) patch embeddings with positions
    timestep: torch.Tensor  # adaLN-single modulation input (B, 6·hidden)
    embedded_timestep: torch.Tensor  # (B, hidden) for the final layer
    text: torch.Tensor  # (B, L, hidden) projected caption
    text_bias: torch.Tensor | None  # (B, 1, L) additive cross-attention bias
    grid: tuple[int, int]  # latent patches per side (h, w)


def embed_inputs(
    model: PixArtTransformer2DModel,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None = None,
) -> Embedded:
    """Patch-embed ``latents``, embed ``timesteps`` and project ``text`` (as PixArt does)."""
    batch = latents.shape[0]
    patch = model.config.patch_size
    grid = (latents.shape[-2] // patch, latents.shape[-1] // patch)
    hidden = model.pos_embed(latents)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(batch)
    t, embedded_t = model.adaln_single(timesteps, None, batch_size=batch, hidden_dtype=hidden.dtype)
    text_h = model.caption_projection(text).view(batch, -1, hidden.shape[-1])
    bias = None
    if text_mask is not None:
        bias = ((1 - text_mask.to(hidden.dtype)) * -10000.0).unsqueeze(1)
    return Embedded(hidden, t, embedded_t, text_h, bias, grid)


def run_block(block: torch.nn.Module, hidden: torch.Tensor, emb: Embedded) -> torch.Tensor:
    """One transformer block with the shared conditioning of ``emb``."""
    return block(
        hidden,
        encoder_hidden_states=emb.text,
        encoder_attention_mask=emb.text_bias,
        timestep=emb.timestep,
    )


def final_layer(
    model: PixArtTransformer2DModel, hidden: torch.Tensor, emb: Embedded
) -> torch.Tensor:
    """PixArt's modulated final norm, projection and unpatchify → (B, C, H, W)."""
    shift, scale = (model.scale_shift_table[None] + emb.embedded_timestep[:, None]).chunk(2, dim=1)
    hidden = model.norm_out(hidden) * (1 + scale) + shift
    hidden = model.proj_out(hidden)
    p, c = model.config.patch_size, model.out_channels
    h, w = emb.grid
    hidden = hidden.reshape(-1, h, w, p, p, c)
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    return hidden.reshape(-1, c, h * p, w * p)


def transformer_forward(
    model: PixArtTransformer2DModel,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    residuals: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Predicted noise for ``latents`` at ``timesteps`` given text tokens.

    ``residuals`` (from a ControlNet) are added to the outputs of the first ``len(residuals)``
    blocks. Returns a tensor shaped like ``latents``.
    """
    emb = embed_inputs(model, latents, timesteps, text, text_mask)
    hidden = emb.hidden
    residuals = residuals or ()
    if len(residuals) > len(model.transformer_blocks):
        raise ValueError(
            f"{len(residuals)} control residuals for {len(model.transformer_blocks)} blocks"
        )
    for i, block in enumerate(model.transformer_blocks):
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            hidden = torch.utils.checkpoint.checkpoint(
                run_block, block, hidden, emb, use_reentrant=False
            )
        else:
            hidden = run_block(block, hidden, emb)
        if i < len(residuals):
            hidden = hidden + residuals[i]
    return final_layer(model, hidden, emb)
