"""Multi-crop augmentations and iBOT block masking (cxrfoundry.train.augment)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrfoundry.train.augment import (
    AugmentConfig,
    BlockMasking,
    DinoTransform,
    collate_crops,
    crop_affine,
    equalize_histogram,
    gaussian_blur,
    make_crop,
    sample_generator,
)

from .dino_shards import _png, make_image, one_torch_thread  # noqa: F401 (autouse fixture)


def _image_bytes(size: int = 64, seed: int = 0) -> bytes:
    image, _ = make_image(np.random.default_rng(seed), size, True, False)
    return _png(image)


def test_multicrop_shapes_and_masks() -> None:
    cfg = AugmentConfig(global_size=64, local_size=32, n_local=3)
    out = DinoTransform(cfg, patch_size=8, seed=1)(_image_bytes(), epoch=0, index=5)
    assert out["global_crops"].shape == (2, 3, 64, 64)
    assert out["local_crops"].shape == (3, 3, 32, 32)
    assert out["masks"].shape == (2, 64) and out["masks"].dtype == torch.bool
    assert torch.isfinite(out["global_crops"]).all()
    batch = collate_crops([out, out, out])
    assert batch["global_crops"].shape == (6, 3, 64, 64)
    assert batch["local_crops"].shape == (9, 3, 32, 32)
    # Crop-major: rows 0..2 are crop 0 of each sample.
    assert torch.equal(batch["global_crops"][1], out["global_crops"][0])
    assert torch.equal(batch["global_crops"][3], out["global_crops"][1])


def test_transform_is_deterministic_per_epoch_and_index() -> None:
    cfg = AugmentConfig(global_size=32, local_size=16, n_local=2)
    transform = DinoTransform(cfg, patch_size=8, seed=7)
    data = _image_bytes()
    a, b = transform(data, 1, 3), transform(data, 1, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = transform(data, 2, 3)
    assert not torch.equal(a["global_crops"], c["global_crops"])
    d = DinoTransform(cfg, patch_size=8, seed=8)(data, 1, 3)
    assert not torch.equal(a["global_crops"], d["global_crops"])


def test_identity_crop_reproduces_the_image() -> None:
    cfg = AugmentConfig(
        global_size=32, flip_p=0, affine_p=0, jitter_p=0, blur_p=(0, 0, 0), solarize_p=0,
        global_scale=(1.0, 1.0), ratio=(1.0, 1.0), equalize=False, mean=(0, 0, 0), std=(1, 1, 1),
    )  # fmt: skip
    image = torch.rand(32, 32)
    spec = cfg.crop_specs()[0]
    crop = make_crop(image, spec, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(crop[0], image, atol=1e-5)
    assert torch.equal(crop[0], crop[2])


def test_flip_and_rotation_matrices() -> None:
    flip = AugmentConfig(flip_p=1.0, affine_p=0)
    theta = crop_affine(torch.Generator().manual_seed(0), 10, 10, (1, 1), (1, 1), flip)
    assert torch.allclose(theta, torch.tensor([[-1.0, 0, 0], [0, 1.0, 0]]), atol=1e-6)
    rotate = AugmentConfig(flip_p=0, affine_p=1.0, rotate_deg=20, translate=0.0)
    for seed in range(5):
        theta = crop_affine(torch.Generator().manual_seed(seed), 10, 10, (1, 1), (1, 1), rotate)
        linear = theta[:, :2]
        scale = torch.linalg.det(linear).abs().sqrt()
        assert 1 / 1.2 - 1e-4 <= scale <= 1 / 0.8 + 1e-4
        angle = torch.rad2deg(torch.atan2(linear[1, 0], linear[0, 0])).abs()
        assert angle <= 20 + 1e-3


def test_equalize_histogram_flattens_and_handles_16_bit() -> None:
    image = torch.tensor(np.random.default_rng(0).integers(100, 140, (64, 64)), dtype=torch.uint8)
    eq = equalize_histogram(image)
    assert eq.min() == 0 and eq.max() == 1
    hist = torch.histc(eq, bins=4, min=0, max=1)
    assert hist.min() > 0.15 * eq.numel()  # roughly uniform after equalisation
    wide = torch.tensor(np.random.default_rng(0).integers(0, 4096, (16, 16)), dtype=torch.int32)
    assert equalize_histogram(wide).max() == 1
    assert equalize_histogram(torch.full((4, 4), 7, dtype=torch.uint8)).eq(0).all()
    with pytest.raises(TypeError):
        equalize_histogram(torch.rand(4, 4))


def test_blur_keeps_mean_and_smooths() -> None:
    image = torch.rand(1, 32, 32)
    blurred = gaussian_blur(image, 1.5)
    assert blurred.shape == image.shape
    assert abs(blurred.mean() - image.mean()) < 0.02
    assert blurred.std() < image.std() / 2


def test_block_masking_ratio_bounds() -> None:
    masking = BlockMasking(grid=(14, 14), probability=1.0, ratio=(0.1, 0.5))
    ratios = []
    for seed in range(30):
        mask = masking(sample_generator(0, seed))
        assert mask.shape == (196,)
        ratios.append(mask.float().mean().item())
    assert min(ratios) >= 0.05 and max(ratios) <= 0.5 + 1e-6
    assert np.std(ratios) > 0.02
    never = BlockMasking(grid=(4, 4), probability=0.0)
    assert not never(sample_generator(0, 0)).any()


def test_unknown_augment_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="globl_size"):
        AugmentConfig.from_dict({"globl_size": 10})
