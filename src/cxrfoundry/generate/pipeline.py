"""A diffusers pipeline that generates chest X-rays from a prompt in a few lines::

    from cxrfoundry.generate.pipeline import ChexGenPipeline
    pipe = ChexGenPipeline.from_pretrained("results/models/chexgen")
    image = pipe("Frontal PA chest radiograph. Moderate right pleural effusion.", seed=0).images[0]

Components (saved by ``save_pretrained`` in the usual diffusers layout): ``transformer``
(:class:`~diffusers.PixArtTransformer2DModel`, EMA weights), ``vae``
(:class:`~diffusers.AutoencoderKL`), ``scheduler`` (:class:`~diffusers.DDIMScheduler`),
``text_encoder`` + ``tokenizer`` (the frozen text encoder used for the feature cache); the
``max_tokens`` the prompts are padded to and the report sections they are read from
(``prompt_sections``, null = the whole report) are part of the pipeline config. A ControlNet
(:class:`~cxrfoundry.generate.controlnet.ChexGenControlNet`) is passed per call with a
condition image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from cxrfoundry.generate import controlnet as cn
from cxrfoundry.generate import diffusion
from cxrfoundry.generate import vae as vae_lib

log = logging.getLogger(__name__)


@dataclass
class ChexGenOutput(BaseOutput):
    """Generated images: a list of grayscale PIL images, a ``(B, 1, H, W)`` [0, 1] tensor,
    a ``(B, H, W)`` float array, or scaled latents (``output_type``)."""

    images: Any


class ChexGenPipeline(DiffusionPipeline):
    """Text- (and optionally mask/box-) conditioned CXR generation with DDIM + guidance."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        transformer: Any,
        vae: Any,
        scheduler: Any,
        text_encoder: Any,
        tokenizer: Any,
        max_tokens: int = 120,
        prompt_sections: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
        self.register_to_config(
            max_tokens=int(max_tokens),
            prompt_sections=list(prompt_sections) if prompt_sections else None,
        )

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell (the VAE's downsampling)."""
        return vae_lib.downsample_factor(self.vae)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, mask) of ``prompts`` with the pipeline's frozen text encoder, reading
        only the report sections the model was trained on (``prompt_sections``)."""
        from cxrfoundry.generate.features import prompt_text

        sections = getattr(self.config, "prompt_sections", None)
        return diffusion.encode_prompts(
            self.text_encoder,
            self.tokenizer,
            [prompt_text(p, sections) for p in prompts],
            max_tokens=self.config.max_tokens,
            device=self._execution_device,
        )

    def encode_condition(self, control_image: Any, batch: int) -> torch.Tensor:
        """VAE latents of condition images (``H×W`` / ``B×H×W`` / ``B×1×H×W`` in [0, 1])."""
        image = torch.as_tensor(np.asarray(control_image), dtype=torch.float32)
        if image.ndim == 2:
            image = image[None, None]
        elif image.ndim == 3:
            image = image.unsqueeze(1)  # a batch of H×W condition images
        if image.ndim != 4 or image.shape[1] != 1:
            raise ValueError(f"control_image must be H×W, B×H×W or B×1×H×W, got {image.shape}")
        image = image.to(self._execution_device)
        latents = vae_lib.encode(self.vae, image)
        if latents.shape[0] not in (1, batch):
            raise ValueError(f"{latents.shape[0]} condition images for a batch of {batch}")
        return latents.expand(batch, -1, -1, -1) if latents.shape[0] == 1 else latents

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        controlnet: cn.ChexGenControlNet | None = None,
        control_image: Any = None,
        conditioning_scale: float = 1.0,
        output_type: str = "pil",
        progress: bool = False,
    ) -> ChexGenOutput:
        """Generate ``num_images_per_prompt`` images per prompt.

        ``seed`` (or an explicit CPU ``generator``) makes the result reproducible; with a
        ``controlnet`` and ``control_image`` the sample follows the mask/box layout while the
        guidance scale still applies to the whole latent.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        factor = self.latent_factor
        size = self.transformer.config.sample_size
        h = (height // factor) if height else size
        w = (width // factor) if width else size
        text, mask = self.encode_prompt(prompts)
        null_text, null_mask = self.encode_prompt([""])
        condition = None
        if controlnet is not None:
            if control_image is None:
                raise ValueError("a controlnet needs a control_image")
            condition = self.encode_condition(control_image, len(prompts))
        denoise = cn.control_denoiser(self.transformer, controlnet, condition, conditioning_scale)
        out = diffusion.ddim_sample(
            denoise,
            text,
            mask,
            null_text,
            null_mask,
            latent_shape=(self.transformer.config.in_channels, h, w),
            scheduler=self.scheduler,
            num_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=generator,
            latents=latents,
            progress=progress,
        )
        if output_type == "latent":
            return ChexGenOutput(images=out)
        images = vae_lib.decode(self.vae, out).float().cpu()
        if output_type == "pt":
            return ChexGenOutput(images=images)
        array = images[:, 0].numpy()
        if output_type == "np":
            return ChexGenOutput(images=array)
        if output_type != "pil":
            raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        pil = [Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in array]
        return ChexGenOutput(images=pil)
