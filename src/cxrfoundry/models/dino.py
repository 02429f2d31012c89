"""DINOv2-style backbone and projection heads for CXformer pretraining.

The backbone is always a Hugging Face ``Dinov2WithRegistersModel`` so that the trained weights are
saved with ``save_pretrained`` and load back with ``AutoModel.from_pretrained``. Zero register
tokens gives the stock DINOv2 architecture; CXformer uses four. A backbone is built either from a
preset/architecture config (random initialisation) or, for continual pretraining, from a
checkpoint (local folder or hub id) of a ``dinov2`` or ``dinov2_with_registers`` model; register
tokens are added when the checkpoint has none.

The DINO (image-level, on CLS) and iBOT (patch-level) heads are separate modules with the same
design: an MLP down to a bottleneck, L2 normalisation, then cosine similarity with a set of
L2-normalised prototypes (the weight-normalised last layer of DINO with its gain fixed to 1).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

log = logging.getLogger(__name__)

#: Architecture presets (DINOv2 naming). ``vit_demo`` is sized for the CPU demo.
PRESETS: dict[str, dict[str, Any]] = {
    "vit_demo": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4},
    "vit_tiny": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3},
    "vit_small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "vit_base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "vit_large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
}

#: Config keys of :func:`build_backbone` passed through to ``Dinov2WithRegistersConfig``.
ARCH_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_ratio",
    "patch_size",
    "image_size",
    "drop_path_rate",
    "layerscale_value",
    "use_swiglu_ffn",
    "layer_norm_eps",
)

#: Std of the random initialisation of new register tokens. The Hugging Face init sets them to
#: zero; identical registers get identical gradients and would never become distinct.
REGISTER_INIT_STD = 0.02


def _init_registers(model: Dinov2WithRegistersModel, seed: int | None) -> None:
    tokens = model.embeddings.register_tokens
    if tokens.numel() == 0:
        return
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    with torch.no_grad():
        values = torch.randn(tokens.shape, generator=generator) * REGISTER_INIT_STD
        tokens.copy_(values.clamp_(-2 * REGISTER_INIT_STD, 2 * REGISTER_INIT_STD))


def backbone_config(cfg: Mapping[str, Any]) -> Dinov2WithRegistersConfig:
    """The ``Dinov2WithRegistersConfig`` of a random-init backbone described by ``cfg``.

    ``cfg`` keys: ``arch`` (a :data:`PRESETS` name, default ``vit_small``), ``num_register_tokens``
    (default 4) and any of :data:`ARCH_KEYS` to override the preset (``patch_size`` defaults to
    14, ``image_size`` to 224: the size at which position embeddings are stored).
    """
    arch = cfg.get("arch", "vit_small")
    if arch not in PRESETS:
        raise ValueError(f"unknown backbone arch {arch!r}; expected one of {sorted(PRESETS)}")
    values: dict[str, Any] = {"patch_size": 14, "image_size": 224, **PRESETS[arch]}
    values.update({k: cfg[k] for k in ARCH_KEYS if cfg.get(k) is not None})
    values["num_register_tokens"] = int(cfg.get("num_register_tokens", 4))
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ValueError(
            f"hidden_size {values['hidden_size']} is not divisible by "
            f"num_attention_heads {values['num_attention_heads']}"
        )
    return Dinov2WithRegistersConfig(**values)


def build_backbone(cfg: Mapping[str, Any], *, seed: int | None = None) -> Dinov2WithRegistersModel:
    """Build the DINO backbone: from ``cfg["pretrained"]`` if set, else randomly initialised.

    ``cfg["pretrained"]`` is a local folder or hub id of a ``dinov2`` or ``dinov2_with_registers``
    checkpoint. ``num_register_tokens`` (int) adds registers to a checkpoint that has none; with a
    registers checkpoint it must match (or be omitted). ``drop_path_rate`` may be overridden for
    continual pretraining. Random init is seeded by ``seed`` so reruns are identical.
    """
    if seed is not None:
        torch.manual_seed(int(seed))
    source = cfg.get("pretrained")
    if not source:
        model = Dinov2WithRegistersModel(backbone_config(cfg))
        _init_registers(model, seed)
        return model
    source = str(source)
    overrides = {k: cfg[k] for k in ("drop_path_rate",) if cfg.get(k) is not None}
    base = AutoConfig.from_pretrained(source)
    wanted = cfg.get("num_register_tokens")
    if base.model_type == "dinov2_with_registers":
        if wanted is not None and int(wanted) != base.num_register_tokens:
            raise ValueError(
                f"{source}: checkpoint has {base.num_register_tokens} register tokens, "
                f"config asks for {wanted}; changing a trained register count is not supported"
            )
        return Dinov2WithRegistersModel.from_pretrained(source, **overrides)
    if base.model_type != "dinov2":
        raise ValueError(
            f"{source}: model_type {base.model_type!r} is not a DINOv2 checkpoint "
            "(expected 'dinov2' or 'dinov2_with_registers')"
        )
    stock = Dinov2Model.from_pretrained(source, **overrides)
    fields = set(Dinov2WithRegistersConfig().to_dict())
    values = {k: v for k, v in stock.config.to_dict().items() if k in fields}
    values.update(model_type="dinov2_with_registers", num_register_tokens=int(wanted or 0))
    values.pop("architectures", None)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**values))
    missing, unexpected = model.load_state_dict(stock.state_dict(), strict=False)
    if unexpected or set(missing) - {"embeddings.register_tokens"}:
        raise ValueError(
            f"{source}: weights do not map onto Dinov2WithRegistersModel "
            f"(missing {missing}, unexpected {unexpected})"
        )
    _init_registers(model, seed)
    log.info(
        "loaded %s (dinov2) and added %d register tokens", source, values["num_register_tokens"]
    )
    return model


def num_prefix_tokens(model: nn.Module) -> int:
    """CLS plus register tokens in front of the patch tokens of a ViT backbone's output."""
    return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)


class ProjectionHead(nn.Module):
    """DINO/iBOT head: MLP → bottleneck → L2 norm → cosine logits against ``n_prototypes``.

    ``n_layers`` linear layers (GELU between them) map ``in_dim`` to ``bottleneck_dim``; the
    prototypes are normalised on every call, which is DINO's weight-normalised last layer with the
    gain frozen at 1 (so logits are cosines in [-1, 1], scaled later by the temperature).
    """

    def __init__(
        self,
        in_dim: int,
        n_prototypes: int,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 384,
        n_layers: int = 3,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError("n_layers must be >= 1")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(n_prototypes, bottleneck_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal weights (std 0.02) and zero biases, as in DINO."""
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (cosine similarities) of shape ``(..., n_prototypes)``."""
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return F.linear(z, F.normalize(self.prototypes, dim=-1, eps=1e-6))


def head_from_config(in_dim: int, cfg: Mapping[str, Any]) -> ProjectionHead:
    """A :class:`ProjectionHead` from ``{n_prototypes, hidden_dim, bottleneck_dim, n_layers}``."""
    return ProjectionHead(
        in_dim,
        int(cfg.get("n_prototypes", 16384)),
        hidden_dim=int(cfg.get("hidden_dim", 2048)),
        bottleneck_dim=int(cfg.get("bottleneck_dim", 384)),
        n_layers=int(cfg.get("n_layers", 3)),
    )


class DinoStudent(nn.Module):
    """Backbone + DINO head + iBOT head, run on all crops in one call (one DDP forward)."""

    def __init__(
        self, backbone: Dinov2WithRegistersModel, dino_head: nn.Module, ibot_head: nn.Module
    ):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    def encode(
        self, pixels: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS token and patch tokens (registers dropped) of the normalised last layer."""
        out = self.backbone(pixel_values=pixels, bool_masked_pos=masks)
        hidden = out.last_hidden_state
        return hidden[:, 0], hidden[:, num_prefix_tokens(self.backbone) :]

    def forward(
        self,
        global_crops: torch.Tensor,
        masks: torch.Tensor | None,
        local_crops: torch.Tensor | None = None,
        patch_select: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Outputs for a student (``masks`` given) or teacher (``masks`` None) pass.

        ``patch_select`` is a bool ``(n_global, n_patches)`` array picking the patch tokens fed to
        the iBOT head (the masked ones); it defaults to ``masks``. The selection may be empty, in
        which case the head still runs (on zero rows) so every parameter takes part in backward.
        """
        cls, patches = self.encode(global_crops, masks)
        select = masks if patch_select is None else patch_select
        out = {"global_cls": cls, "global_logits": self.dino_head(cls)}
        if select is not None:
            out["patch_logits"] = self.ibot_head(patches[select])
        if local_crops is not None and local_crops.shape[0]:
            local_cls, _ = self.encode(local_crops)
            out["local_logits"] = self.dino_head(local_cls)
        return out
