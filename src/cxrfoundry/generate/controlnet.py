"""ControlNet for the diffusion transformer (ChexGen's mask- and box-guided generation).

A trainable copy of the first half of the base transformer's blocks is fed with the base's
patch embedding of the noisy latent plus a zero-initialised projection of the VAE-encoded
condition image (anatomy masks, rendered lesion boxes). After each copied block a
zero-initialised linear layer produces a residual that is added to the output of the matching
base block. The base model stays frozen; at initialisation every residual is exactly zero, so
the base model's prediction is unchanged (tested) and training starts from it.

Condition images are rendered by :func:`render_condition`: lungs, heart and lesion masks at
distinct gray levels, with lesion boxes drawn as outlines.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin, PixArtTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed

from cxrfoundry.generate import dit
from cxrfoundry.schema import MASK_BITS

log = logging.getLogger(__name__)

#: Gray level of each structure in a condition image (later ones drawn on top).
CONDITION_LEVELS: dict[str, float] = {"lungs": 0.35, "heart": 0.65, "lesion": 1.0}


class ChexGenControlNet(ModelMixin, ConfigMixin):
    """Control branch: ``num_layers`` copied blocks + zero-initialised input/output projections.

    Build it from a base model with :meth:`from_transformer`; it is saved and loaded with
    diffusers' ``save_pretrained`` / ``from_pretrained``.
    """

    @register_to_config
    def __init__(
        self,
        *,
        num_layers: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int,
        condition_channels: int = 4,
        patch_size: int = 2,
        sample_size: int = 32,
        interpolation_scale: int = 1,
        norm_eps: float = 1e-6,
        attention_bias: bool = True,
        activation_fn: str = "gelu-approximate",
    ) -> None:
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.condition_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=condition_channels,
            embed_dim=inner,
            interpolation_scale=interpolation_scale,
            pos_embed_type=None,  # positions come with the base embedding it is added to
        )
        self.input_proj = torch.nn.Linear(inner, inner)
        self.blocks = torch.nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner,
                    num_attention_heads,
                    attention_head_dim,
                    cross_attention_dim=cross_attention_dim,
                    activation_fn=activation_fn,
                    num_embeds_ada_norm=1000,
                    attention_bias=attention_bias,
                    norm_type="ada_norm_single",
                    norm_elementwise_affine=False,
                    norm_eps=norm_eps,
                )
                for _ in range(num_layers)
            ]
        )
        self.output_projs = torch.nn.ModuleList(
            [torch.nn.Linear(inner, inner) for _ in range(num_layers)]
        )
        self.zero_projections()

    def zero_projections(self) -> None:
        """Zero the input and output projections (the ControlNet starting point)."""
        for layer in [self.input_proj, *self.output_projs]:
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)

    @classmethod
    def from_transformer(
        cls,
        base: PixArtTransformer2DModel,
        *,
        condition_channels: int | None = None,
        num_layers: int | None = None,
    ) -> ChexGenControlNet:
        """A ControlNet whose blocks are copies of the first half (default) of ``base``'s."""
        cfg = base.config
        n = num_layers if num_layers is not None else max(1, cfg.num_layers // 2)
        if not 1 <= n <= cfg.num_layers:
            raise ValueError(f"num_layers {n} outside 1..{cfg.num_layers}")
        net = cls(
            num_layers=n,
            num_attention_heads=cfg.num_attention_heads,
            attention_head_dim=cfg.attention_head_dim,
            cross_attention_dim=cfg.cross_attention_dim,
            condition_channels=condition_channels or cfg.in_channels,
            patch_size=cfg.patch_size,
            sample_size=cfg.sample_size,
            interpolation_scale=cfg.interpolation_scale or 1,
            norm_eps=cfg.norm_eps,
            attention_bias=cfg.attention_bias,
            activation_fn=cfg.activation_fn,
        )
        for copy, block in zip(net.blocks, base.transformer_blocks[:n], strict=True):
            copy.load_state_dict(block.state_dict())
        # Start the condition embedding from the base patch embedding (same latent space).
        if net.config.condition_channels == cfg.in_channels:
            net.condition_embed.proj.load_state_dict(base.pos_embed.proj.state_dict())
        return net

    def forward(self, emb: dit.Embedded, condition: torch.Tensor) -> list[torch.Tensor]:
        """Residuals for the first ``num_layers`` base blocks from the base's embedded inputs
        ``emb`` (see :func:`dit.embed_inputs`) and condition latents ``(B, C, h, w)``."""
        if condition.shape[0] != emb.hidden.shape[0]:
            raise ValueError(
                f"condition batch {condition.shape[0]} != latent batch {emb.hidden.shape[0]}"
            )
        hidden = emb.hidden + self.input_proj(self.condition_embed(condition))
        residuals = []
        for block, proj in zip(self.blocks, self.output_projs, strict=True):
            hidden = dit.run_block(block, hidden, emb)
            residuals.append(proj(hidden))
        return residuals


def controlled_forward(
    base: PixArtTransformer2DModel,
    controlnet: ChexGenControlNet | None,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
    condition: torch.Tensor | None,
    conditioning_scale: float = 1.0,
) -> torch.Tensor:
    """Noise prediction of the base model steered by ``controlnet`` with ``condition``."""
    if controlnet is None or condition is None:
        return dit.transformer_forward(base, latents, timesteps, text, text_mask)
    emb = dit.embed_inputs(base, latents, timesteps, text, text_mask)
    residuals = controlnet(emb, condition.to(latents))
    hidden = emb.hidden
    for i, block in enumerate(base.transformer_blocks):
        hidden = dit.run_block(block, hidden, emb)
        if i < len(residuals):
            hidden = hidden + conditioning_scale * residuals[i]
    return dit.final_layer(base, hidden, emb)


def control_denoiser(
    base: PixArtTransformer2DModel,
    controlnet: ChexGenControlNet | None,
    condition: torch.Tensor | None,
    conditioning_scale: float = 1.0,
):
    """A :data:`~cxrfoundry.generate.diffusion.Denoiser` closing over the condition latents.

    When guidance doubles the batch, the condition is repeated so both branches see it.
    """

    def denoise(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor):
        cond = condition
        if cond is not None and cond.shape[0] != x.shape[0]:
            cond = cond.repeat(x.shape[0] // cond.shape[0], 1, 1, 1)
        return controlled_forward(base, controlnet, x, t, text, mask, cond, conditioning_scale)

    return denoise


def render_condition(
    mask_bits: np.ndarray | None,
    boxes: str | Sequence[dict[str, Any]] | None,
    *,
    source_size: tuple[int, int] | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Condition image (float32 ``H×W`` in [0, 1]) from a mask of :data:`MASK_BITS` and boxes.

    ``boxes`` are ``{"label","x","y","w","h"}`` dicts in pixels of ``source_size`` (H, W)
    (default: the mask's size), as JSON text or a list; they are outlined at the lesion level
    and scaled to ``size`` (default the mask's size).
    """
    if mask_bits is None and size is None:
        raise ValueError("render_condition needs a mask or an output size")
    height, width = size if size is not None else mask_bits.shape
    mask_shape = mask_bits.shape if mask_bits is not None else None
    out = np.zeros((height, width), dtype=np.float32)
    if mask_bits is not None:
        if mask_bits.shape != (height, width):
            from PIL import Image

            mask_bits = np.asarray(
                Image.fromarray(mask_bits.astype(np.uint8)).resize(
                    (width, height), Image.Resampling.NEAREST
                )
            )
        for name in ("lungs", "heart", "lesion"):
            out[(mask_bits & MASK_BITS[name]) > 0] = CONDITION_LEVELS[name]
    if isinstance(boxes, str):
        try:
            boxes = json.loads(boxes)
        except json.JSONDecodeError as exc:
            raise ValueError(f"boxes are not valid JSON: {exc}") from exc
    src_h, src_w = source_size or mask_shape or (height, width)
    for box in boxes or []:
        x0 = int(np.floor(box["x"] * width / src_w))
        y0 = int(np.floor(box["y"] * height / src_h))
        x1 = min(width - 1, int(np.ceil((box["x"] + box["w"]) * width / src_w)))
        y1 = min(height - 1, int(np.ceil((box["y"] + box["h"]) * height / src_h)))
        x0, y0 = max(0, x0), max(0, y0)
        level = CONDITION_LEVELS["lesion"]
        out[y0 : y1 + 1, [x0, x1]] = level
        out[[y0, y1], x0 : x1 + 1] = level
    return out
