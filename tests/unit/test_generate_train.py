"""ChexGen training: clipping, exact resume, VAE → features → LDM → ControlNet smoke runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cxrfoundry.generate import features as feat
from cxrfoundry.train import diffusion as tdiff
from cxrfoundry.train import engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_helpers import TEXT_DIM, tiny_text_encoder, write_tiny_shards

VAE_CFG = {
    "image_size": 16,
    "arch": {"block_out_channels": [8, 8], "norm_num_groups": 4},
    "steps": 2,
    "batch_size": 4,
    "lr": 1e-3,
    "device": "cpu",
    "eval_images": 4,
}


def test_optimizer_step_applies_gradient_clipping():
    layer = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    (layer(torch.full((1, 4), 100.0)).sum()).backward()
    norm = tdiff.optimizer_step(layer, opt, grad_clip=1.0)
    assert norm == pytest.approx(200.0)
    # with SGD(lr=1) the update is exactly the clipped gradient: norm 1, not 200
    assert float(layer.weight.detach().norm()) == pytest.approx(1.0, rel=1e-5)
    assert layer.weight.grad is None


def test_run_training_resumes_exactly(tmp_path):
    dist = engine.DistInfo()
    data = torch.randn(32, 3)
    target = data @ torch.tensor([1.0, -2.0, 0.5])

    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(3, 1)

    def loss_fn(model, crash_at=None):
        calls = {"n": 0}

        def fn(idx, g):
            calls["n"] += 1
            if crash_at is not None and calls["n"] == crash_at:
                raise RuntimeError("simulated kill")
            noise = torch.randn(len(idx), generator=g) * 0.01  # draws from the generator
            return ((model(data[idx]).squeeze(1) - target[idx] - noise) ** 2).mean()

        return fn

    loop = tdiff.LoopConfig(steps=4, batch_size=8, lr=0.05, checkpoint_every=2, ema_decay=0.9)
    straight = make()
    kwargs = {"num_samples": 32, "loop": loop, "seed": 1, "dist": dist}
    tdiff.run_training(straight, loss_fn(straight), checkpoint_dir=tmp_path / "a", **kwargs)
    crashed = make()
    with pytest.raises(RuntimeError, match="simulated kill"):
        tdiff.run_training(crashed, loss_fn(crashed, 3), checkpoint_dir=tmp_path / "b", **kwargs)
    resumed = make()
    out = tdiff.run_training(resumed, loss_fn(resumed), checkpoint_dir=tmp_path / "b", **kwargs)
    assert out["resumed_from"] == 2
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert out["flops_per_step"] > 0 and out["samples_per_s"] > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """VAE (2 steps) → features (with control) → LDM (2 steps) on tiny shards."""
    root = tmp_path_factory.mktemp("chexgen")
    shards = write_tiny_shards(root / "shards", n=8, size=32)
    encoder, tokenizer = tiny_text_encoder()
    encoder.save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    vae_metrics = tdiff.train_vae(shards, root / "vae", VAE_CFG, seed=0)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(root / "vae")
    enc, tok = feat.load_text_encoder(str(root / "text"))
    index = feat.encode_features(
        shards,
        root / "features",
        split="train",
        vae=vae,
        text_encoder=enc,
        tokenizer=tok,
        text_encoder_name=str(root / "text"),
        image_size=16,
        max_tokens=8,
        rows_per_file=5,
        with_control=True,
        subset={"views": ["PA", "AP"]},
    )
    ldm_cfg = {
        "model": {"preset": "tiny"},
        "steps": 2,
        "batch_size": 4,
        "device": "cpu",
        "ema_decay": 0.99,
    }
    ldm_metrics = tdiff.train_ldm(
        root / "features", root / "ldm", ldm_cfg, vae_dir=root / "vae", seed=0
    )
    return {
        "root": root,
        "vae": vae_metrics,
        "index": index,
        "ldm": ldm_metrics,
        "ldm_cfg": ldm_cfg,
    }


def test_vae_smoke_train(trained):
    root, metrics = trained["root"], trained["vae"]
    assert (root / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    saved = json.loads((root / "vae" / "metrics.json").read_text())
    assert saved["steps"] == 2 and np.isfinite(saved["psnr"]) and saved["psnr"] > 0
    assert metrics["condition_images"] == 8  # rendered masks/boxes reconstructed as well
    assert metrics["scaling_factor"] > 0
    assert not (root / ".vae.ckpt").exists()  # checkpoints cleared after the final write


def test_feature_cache(trained):
    root, index = trained["root"], trained["index"]
    assert index["counts"] == {"rows_in": 8, "rows_kept": 8, "rows_filtered": 0, "rows_rejected": 0}
    assert [f["rows"] for f in index["files"]] == [5, 3]
    fs = feat.load_features(root / "features")
    assert fs.latents.shape == (8, 4, 8, 8)
    assert fs.text.shape == (8, 8, TEXT_DIM) and fs.text_mask.shape == (8, 8)
    assert fs.control is not None and fs.control.shape == fs.latents.shape
    assert fs.null_text.shape == (1, 8, TEXT_DIM)
    assert fs.rows.column("image_id").to_pylist()[0] == "tiny/train0"
    assert pq.read_table(root / "features" / "rejects.parquet").num_rows == 0


def test_feature_subset_and_rejects(trained, tmp_path):
    import pyarrow as pa

    root = trained["root"]
    shards = root / "shards"
    table = pq.read_table(shards / "train-00000.parquet")
    images = table.column("image").to_pylist()
    images[1] = b"not a png"
    bad = tmp_path / "bad"
    bad.mkdir()
    from cxrfoundry.io import sha256_file, write_json, write_parquet

    write_parquet(
        bad / "train-00000.parquet",
        table.set_column(
            table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())
        ),
    )
    write_json(
        bad / "index.json",
        {
            "shards": [
                {
                    "file": "train-00000.parquet",
                    "split": "train",
                    "rows": 8,
                    "sha256": sha256_file(bad / "train-00000.parquet"),
                }
            ]
        },
    )
    from diffusers import AutoencoderKL

    enc, tok = feat.load_text_encoder(str(root / "text"))
    index = feat.encode_features(
        bad,
        tmp_path / "f",
        split="train",
        vae=AutoencoderKL.from_pretrained(root / "vae"),
        text_encoder=enc,
        tokenizer=tok,
        text_encoder_name=str(root / "text"),
        image_size=16,
        max_tokens=8,
        subset={"views": ["PA"]},
    )
    c = index["counts"]
    assert c["rows_filtered"] == 3  # rows 0, 3, 6 are AP
    assert c["rows_rejected"] == 1 and c["rows_kept"] == 4
    rejects = pq.read_table(tmp_path / "f" / "rejects.parquet").to_pylist()
    assert rejects[0]["image_id"] == "tiny/train1" and "decode" in rejects[0]["reason"]


def test_ldm_smoke_train_and_pipeline(trained):
    from cxrfoundry.generate.pipeline import ChexGenPipeline

    root, metrics = trained["root"], trained["ldm"]
    assert metrics["steps"] == 2 and np.isfinite(metrics["final_loss"])
    assert metrics["flops_per_step"] > 0
    pipe = ChexGenPipeline.from_pretrained(root / "ldm")
    image = pipe("Cardiomegaly.", num_inference_steps=2, seed=0).images[0]
    assert image.size == (16, 16)
    # stage II starts from stage I's weights
    stage2 = tdiff.train_ldm(
        root / "features",
        root / "ldm2",
        {**trained["ldm_cfg"], "steps": 1},
        vae_dir=root / "vae",
        seed=1,
        init_from=root / "ldm",
    )
    assert stage2["init_from"] == str(root / "ldm")


def test_controlnet_smoke_train(trained):
    from cxrfoundry.generate.controlnet import ChexGenControlNet
    from cxrfoundry.generate.pipeline import ChexGenPipeline

    root = trained["root"]
    cfg = {"steps": 2, "batch_size": 4, "device": "cpu", "ema_decay": None, "lr": 1e-3}
    metrics = tdiff.train_controlnet(root / "features", root / "ldm", root / "cn", cfg, seed=0)
    assert metrics["control_layers"] == 1 and np.isfinite(metrics["final_loss"])
    net = ChexGenControlNet.from_pretrained(root / "cn")
    # trained projections are no longer zero: the condition now steers the base model
    assert any(float(p.detach().abs().sum()) > 0 for p in net.output_projs.parameters())
    pipe = ChexGenPipeline.from_pretrained(root / "ldm")
    out = pipe(
        "Cardiomegaly.",
        num_inference_steps=2,
        seed=0,
        controlnet=net,
        control_image=np.zeros((16, 16), dtype=np.float32),
        output_type="np",
    ).images
    assert out.shape == (1, 16, 16)
    base = ChexGenPipeline.from_pretrained(root / "ldm").transformer
    for a, b in zip(base.parameters(), pipe.transformer.parameters(), strict=True):
        assert torch.equal(a, b)  # the base stayed frozen


def test_stage2_at_larger_latents_keeps_positions_and_samples_at_the_new_size(trained, tmp_path):
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

    from cxrfoundry.generate.pipeline import ChexGenPipeline

    root = trained["root"]
    enc, tok = feat.load_text_encoder(str(root / "text"))
    feat.encode_features(
        root / "shards",
        tmp_path / "f32",
        split="train",
        vae=AutoencoderKL.from_pretrained(root / "vae"),
        text_encoder=enc,
        tokenizer=tok,
        text_encoder_name=str(root / "text"),
        image_size=32,
        max_tokens=8,
        sections=["IMPRESSION"],
    )
    cfg = {**trained["ldm_cfg"], "steps": 1}
    tdiff.train_ldm(
        tmp_path / "f32", tmp_path / "s2", cfg, vae_dir=root / "vae", seed=1, init_from=root / "ldm"
    )
    stage1 = PixArtTransformer2DModel.from_pretrained(root / "ldm", subfolder="transformer")
    stage2 = ChexGenPipeline.from_pretrained(tmp_path / "s2")
    assert stage2.transformer.config.sample_size == 16 == 2 * stage1.config.sample_size
    assert stage2.config.prompt_sections == ["IMPRESSION"]
    # stage II's sin-cos table = what stage I computes on the fly for 16x16 latents (same extent)
    x = torch.zeros(1, 4, 16, 16)
    with torch.no_grad():
        on_the_fly = stage1.pos_embed(x) - stage1.pos_embed.proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(stage2.transformer.pos_embed.pos_embed, on_the_fly)
    image = stage2("Cardiomegaly.", num_inference_steps=2, seed=0).images[0]
    assert image.size == (32, 32)
