"""ChexGen diffusion core: transformer forward, guidance, DDIM, ControlNet, pipeline."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from cxrfoundry.generate import controlnet as cn
from cxrfoundry.generate import diffusion, dit
from cxrfoundry.generate import vae as vae_lib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_helpers import LATENT, TEXT_DIM, tiny_text, tiny_text_encoder, tiny_transformer


def _denoiser(model):
    return lambda x, t, text, mask: dit.transformer_forward(model, x, t, text, mask)


def _inputs(batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, LATENT, LATENT, generator=g)
    t = torch.tensor([10, 700][:batch])
    return x, t


def test_presets_and_xl_config():
    cfg = dit.transformer_config({"preset": "XL/2", "text_dim": 4096, "latent_size": 32})
    assert cfg["num_layers"] == 28
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == 1152
    assert cfg["num_attention_heads"] == 16 and cfg["patch_size"] == 2
    assert cfg["out_channels"] == cfg["in_channels"] == 4  # epsilon only
    with pytest.raises(ValueError, match="unknown transformer preset"):
        dit.transformer_config({"preset": "huge", "text_dim": 8})
    with pytest.raises(ValueError, match="text_dim"):
        dit.transformer_config({"preset": "tiny"})


def test_forward_matches_diffusers_model():
    model = tiny_transformer()
    x, t = _inputs()
    text, mask = tiny_text()
    ours = dit.transformer_forward(model, x, t, text, mask)
    ref = model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask).sample
    torch.testing.assert_close(ours, ref)
    assert ours.shape == x.shape
    # fresh models predict zero (zero-initialised output projection, as DiT / PixArt)
    fresh = tiny_transformer(randomize=False)
    assert torch.count_nonzero(dit.transformer_forward(fresh, x, t, text, mask)) == 0


def test_guidance_scale_one_is_conditional_and_zero_is_unconditional():
    model = tiny_transformer()
    x, t = _inputs()
    text, mask = tiny_text()
    null_text, null_mask = tiny_text(batch=1, seed=9)
    denoise = _denoiser(model)
    cond = denoise(x, t, text, mask)
    uncond = denoise(x, t, null_text.expand(2, -1, -1), null_mask.expand(2, -1))
    got1 = diffusion.guided_epsilon(denoise, x, t, text, mask, null_text, null_mask, 1.0)
    torch.testing.assert_close(got1, cond)
    # the doubled-batch path gives the same branches
    got0 = diffusion.guided_epsilon(denoise, x, t, text, mask, null_text, null_mask, 0.0)
    torch.testing.assert_close(got0, uncond, atol=1e-5, rtol=1e-5)
    got4 = diffusion.guided_epsilon(denoise, x, t, text, mask, null_text, null_mask, 4.0)
    torch.testing.assert_close(got4, uncond + 4.0 * (cond - uncond), atol=1e-5, rtol=1e-4)


def test_guidance_applies_to_every_latent_channel():
    model = tiny_transformer()
    x, t = _inputs()
    text, mask = tiny_text()
    null_text, null_mask = tiny_text(batch=1, seed=9)
    denoise = _denoiser(model)
    cond = denoise(x, t, text, mask)
    guided = diffusion.guided_epsilon(denoise, x, t, text, mask, null_text, null_mask, 4.0)
    uncond = denoise(x, t, null_text.expand(2, -1, -1), null_mask.expand(2, -1))
    for c in range(x.shape[1]):
        # each channel moved away from the conditional prediction by (s-1)(cond-uncond)
        delta = guided[:, c] - cond[:, c]
        assert delta.abs().max() > 1e-4, f"channel {c} not guided"
        torch.testing.assert_close(delta, 3.0 * (cond[:, c] - uncond[:, c]), atol=1e-5, rtol=1e-4)


def test_caption_dropout_rate_and_null_embedding():
    text = torch.ones(4000, 3, 2)
    mask = torch.ones(4000, 3, dtype=torch.long)
    null_text, null_mask = torch.zeros(1, 3, 2), torch.tensor([[1, 0, 0]])
    g = torch.Generator().manual_seed(0)
    out, out_mask, dropped = diffusion.drop_captions(text, mask, null_text, null_mask, 0.1, g)
    assert 0.08 < dropped.float().mean() < 0.12
    assert torch.all(out[dropped] == 0) and torch.all(out[~dropped] == 1)
    assert torch.all(out_mask[dropped] == null_mask)


def test_loss_is_seeded_and_finite():
    model = tiny_transformer()
    x, _ = _inputs()
    text, mask = tiny_text()
    null_text, null_mask = tiny_text(batch=1, seed=9)
    sched = diffusion.train_scheduler()
    assert sched.config.beta_schedule == "linear" and sched.config.num_train_timesteps == 1000

    def loss(seed):
        return diffusion.diffusion_loss(
            _denoiser(model),
            x,
            text,
            mask,
            scheduler=sched,
            null_text=null_text,
            null_mask=null_mask,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.isfinite(loss(0))
    assert float(loss(0).detach()) == float(loss(0).detach()) != float(loss(1).detach())


def _sample(model, seed, steps=3, scale=4.0):
    text, mask = tiny_text()
    null_text, null_mask = tiny_text(batch=1, seed=9)
    return diffusion.ddim_sample(
        _denoiser(model),
        text,
        mask,
        null_text,
        null_mask,
        latent_shape=(4, LATENT, LATENT),
        scheduler=diffusion.sampling_scheduler(),
        num_steps=steps,
        guidance_scale=scale,
        generator=torch.Generator().manual_seed(seed),
    )


def test_ddim_is_deterministic_given_seed():
    model = tiny_transformer()
    a, b, c = _sample(model, 0), _sample(model, 0), _sample(model, 1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ddim_matches_scheduler_math():
    """Two DDIM steps (η = 0) with a fixed noise prediction, recomputed by hand."""
    sched = diffusion.sampling_scheduler()
    eps_value = torch.full((1, 4, 2, 2), 0.3)
    x_t = torch.randn((1, 4, 2, 2), generator=torch.Generator().manual_seed(5))
    text, mask = torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.long)
    out = diffusion.ddim_sample(
        lambda x, t, tx, m: eps_value.expand_as(x),
        text,
        mask,
        text,
        mask,
        latent_shape=(4, 2, 2),
        scheduler=sched,
        num_steps=2,
        guidance_scale=1.0,
        latents=x_t.clone(),
    )
    alphas = sched.alphas_cumprod.double()
    assert sched.timesteps.tolist() == [501, 1]
    x = x_t.double()
    eps = eps_value.double()
    for t in (501, 1):
        prev = t - 500
        a_t = alphas[t]
        a_prev = alphas[prev] if prev >= 0 else alphas[0]  # set_alpha_to_one=False
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(out.double(), x, atol=1e-5, rtol=1e-5)
    assert isinstance(sched, DDIMScheduler)


def test_zero_initialised_controlnet_leaves_base_unchanged_then_steers():
    base = tiny_transformer(num_layers=4)
    net = cn.ChexGenControlNet.from_transformer(base)
    assert len(net.blocks) == 2  # first half of the blocks
    torch.testing.assert_close(
        net.blocks[1].state_dict()["attn1.to_q.weight"],
        base.transformer_blocks[1].state_dict()["attn1.to_q.weight"],
    )
    x, t = _inputs()
    text, mask = tiny_text()
    cond = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(4))
    plain = dit.transformer_forward(base, x, t, text, mask)
    controlled = cn.controlled_forward(base, net, x, t, text, mask, cond)
    torch.testing.assert_close(controlled, plain, atol=0, rtol=0)
    # once the zero projections are trained, the condition changes the prediction
    with torch.no_grad():
        for proj in [net.input_proj, *net.output_projs]:
            proj.weight.normal_(0, 0.05)
    steered = cn.controlled_forward(base, net, x, t, text, mask, cond)
    other = cn.controlled_forward(base, net, x, t, text, mask, -cond)
    assert not torch.allclose(steered, plain) and not torch.allclose(steered, other)


def test_controlnet_gradients_reach_only_the_control_branch():
    base = tiny_transformer(num_layers=2)
    base.requires_grad_(False)
    net = cn.ChexGenControlNet.from_transformer(base)
    x, t = _inputs()
    text, mask = tiny_text()
    cond = torch.randn(2, 4, LATENT, LATENT)
    cn.controlled_forward(base, net, x, t, text, mask, cond).square().mean().backward()
    assert all(p.grad is None for p in base.parameters())
    assert net.output_projs[0].weight.grad.abs().sum() > 0


def test_guidance_works_with_control():
    base = tiny_transformer(num_layers=2)
    net = cn.ChexGenControlNet.from_transformer(base)
    with torch.no_grad():
        for proj in [net.input_proj, *net.output_projs]:
            proj.weight.normal_(0, 0.05)
    x, t = _inputs()
    text, mask = tiny_text()
    null_text, null_mask = tiny_text(batch=1, seed=9)
    cond = torch.randn(2, 4, LATENT, LATENT)
    denoise = cn.control_denoiser(base, net, cond)
    guided = diffusion.guided_epsilon(denoise, x, t, text, mask, null_text, null_mask, 3.0)
    c = cn.controlled_forward(base, net, x, t, text, mask, cond)
    u = cn.controlled_forward(
        base, net, x, t, null_text.expand(2, -1, -1), null_mask.expand(2, -1), cond
    )
    torch.testing.assert_close(guided, u + 3.0 * (c - u), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(guided, c)  # the scale is not ignored


def test_render_condition_levels_and_boxes():
    bits = np.zeros((8, 8), dtype=np.uint8)
    bits[1:7, 1:4] = 1  # lungs
    bits[4:7, 3:6] |= 2  # heart
    img = cn.render_condition(bits, '[{"label": "Mass", "x": 0, "y": 0, "w": 4, "h": 4}]')
    assert img[5, 1] == pytest.approx(cn.CONDITION_LEVELS["lungs"])
    assert img[5, 4] == pytest.approx(cn.CONDITION_LEVELS["heart"])
    assert img[0, 2] == img[4, 0] == 1.0  # box outline
    assert img.shape == (8, 8)
    up = cn.render_condition(bits, None, size=(16, 16))
    assert up.shape == (16, 16) and up[11, 3] == pytest.approx(cn.CONDITION_LEVELS["lungs"])
    with pytest.raises(ValueError, match="JSON"):
        cn.render_condition(bits, "[oops")


def _tiny_pipeline():
    from cxrfoundry.generate.pipeline import ChexGenPipeline

    torch.manual_seed(0)
    vae = vae_lib.build_vae({"arch": {"block_out_channels": [8, 8], "norm_num_groups": 4}})
    encoder, tokenizer = tiny_text_encoder()
    return ChexGenPipeline(
        transformer=tiny_transformer(),
        vae=vae.eval(),
        scheduler=diffusion.sampling_scheduler(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        max_tokens=12,
    )


def test_pipeline_save_load_roundtrip_generates(tmp_path):
    from cxrfoundry.generate.pipeline import ChexGenPipeline

    pipe = _tiny_pipeline()
    kwargs = {"num_inference_steps": 2, "seed": 7, "guidance_scale": 4.0}
    images = pipe("Cardiomegaly.", **kwargs).images
    assert len(images) == 1 and images[0].size == (16, 16) and images[0].mode == "L"
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = ChexGenPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.config.max_tokens == 12
    again = loaded("Cardiomegaly.", **kwargs).images
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))
    batch = loaded(["a", "b"], num_images_per_prompt=2, output_type="pt", **kwargs).images
    assert batch.shape == (4, 1, 16, 16) and 0 <= float(batch.min()) <= float(batch.max()) <= 1
    # a ControlNet and a condition image go through the same call
    net = cn.ChexGenControlNet.from_transformer(loaded.transformer)
    controlled = loaded(
        "Cardiomegaly.", controlnet=net, control_image=np.zeros((16, 16)), **kwargs
    ).images
    assert np.array_equal(np.asarray(controlled[0]), np.asarray(images[0]))  # zero-init
    assert loaded.text_encoder.config.hidden_size == TEXT_DIM
