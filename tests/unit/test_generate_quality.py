"""Generation-quality metrics on known inputs, and the judge models on tiny shards."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrfoundry.eval import metrics as M
from cxrfoundry.generate import quality as Q

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_helpers import write_tiny_shards


def _images(n=48, size=32, seed=0, bright=0.0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = torch.rand(n, generator=g) * size * 0.3 + size * 0.1
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2)[None] < radius[:, None, None] ** 2
    noise = torch.rand(n, size, size, generator=g) * 60
    return (noise + disc * (120 + bright)).clamp(0, 255).to(torch.uint8)


def _stats_extractor():
    """Hand-made features (mean, std, centre, edge and a few quantiles of the pixels)."""

    def fn(images):
        flat = images.flatten(1)
        c = images.shape[-1] // 2
        q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9]), dim=1).T
        centre = images[:, 0, c - 2 : c + 2, c - 2 : c + 2].flatten(1).mean(1, keepdim=True)
        edge = images[:, 0, :2].flatten(1).mean(1, keepdim=True)
        return torch.cat(
            [flat.mean(1, keepdim=True), flat.std(1, keepdim=True), centre, edge, q], 1
        )

    return Q.FeatureExtractor(fn, 7)


def test_fid_of_a_set_to_itself_is_zero_and_grows_with_shift():
    real = _images(seed=0)
    scores = Q.fid_scores(
        _stats_extractor(),
        real,
        {
            "same": real,
            "other_draw": _images(seed=1),
            "brighter": _images(seed=1, bright=100),
            "noise": Q.noise_images(real, 48, seed=0),
        },
        batch_size=16,
    )
    assert abs(scores["same"]) < 1e-6
    assert 0 < scores["other_draw"] < scores["brighter"]
    assert scores["other_draw"] < scores["noise"]


def test_ms_ssim_of_identical_images_is_one_and_lower_for_different():
    images = _images(n=4, size=128)
    cfg = {"sigma": 1.5, "betas": [0.0517, 0.3295, 0.3462, 0.2726]}  # 4 scales: > 80 px
    same = Q.pairwise_ms_ssim(images[:1].repeat(4, 1, 1)[None], cfg)
    assert same.shape == (1,) and same[0] == pytest.approx(1.0, abs=1e-5)
    different = Q.pairwise_ms_ssim(images[None], cfg)
    assert different[0] < 0.99
    groups = torch.stack([images[:1].repeat(4, 1, 1)[0], images[1], images[2], images[3]])
    assert Q.pairwise_ms_ssim(groups[None], cfg)[0] < same[0]


def test_ms_ssim_scales_follow_the_image_size():
    betas = Q.QUALITY_DEFAULTS["ms_ssim"]["betas"]
    assert Q.ms_ssim_betas(betas, 256, 1.5) == pytest.approx(betas)  # all 5 scales
    four = Q.ms_ssim_betas(betas, 128, 1.5)
    assert four == pytest.approx([0.0517, 0.3295, 0.3462, 0.2726], abs=2e-4)
    assert sum(four) == pytest.approx(sum(betas))
    assert len(Q.ms_ssim_betas(betas, 64, 1.5)) == 3
    with pytest.raises(ValueError, match="too small"):
        Q.ms_ssim_betas(betas, 8, 1.5)
    # The 5-scale defaults on 64 px images: fewer scales, not torchmetrics' padding error.
    images = _images(n=4, size=64)
    value = Q.pairwise_ms_ssim(images[None], Q.QUALITY_DEFAULTS["ms_ssim"])
    assert 0 < value[0] < 1


@pytest.mark.parametrize("n", [2, 3, 17])
def test_derangement_moves_every_index_deterministically(n):
    out = Q.derangement(n, seed=5)
    assert sorted(out.tolist()) == list(range(n))
    assert (out != np.arange(n)).all()
    assert (out == Q.derangement(n, seed=5)).all()


def test_derangement_of_one_item_fails():
    with pytest.raises(ValueError, match="derangement of 1"):
        Q.derangement(1, seed=0)


def test_weighted_pearson_matches_numpy_and_bootstraps():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = 0.6 * x + rng.normal(size=(40, 3))
    stat = Q.weighted_pearson(x, y)
    assert stat(np.ones((1, 40)))[0] == pytest.approx(np.corrcoef(x.ravel(), y.ravel())[0, 1])
    w = rng.integers(0, 3, size=(1, 40)).astype(float)
    rep = np.repeat(np.arange(40), w[0].astype(int))
    expected = np.corrcoef(x[rep].ravel(), y[rep].ravel())[0, 1]
    assert stat(w)[0] == pytest.approx(expected)
    one = Q.weighted_pearson(x[:, 0], y[:, 0])(np.ones((1, 40)))[0]
    assert one == pytest.approx(np.corrcoef(x[:, 0], y[:, 0])[0, 1])
    est, _ = M.bootstrap_statistic(stat, np.arange(40) // 2, n_boot=50, seed=0)
    assert est.ci_low < est.value < est.ci_high


def test_prepare_and_to_stored_shapes():
    images = _images(n=3, size=32)
    out = Q.prepare(images, 16, equalize=True)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8 and int(out.max()) > 240
    stored = Q.to_stored(np.random.default_rng(0).random((2, 16, 16)), 32)
    assert stored.shape == (2, 32, 32) and stored.dtype == torch.uint8
    noise = Q.noise_images(images, 5, seed=1)
    assert noise.shape == (5, 32, 32)
    assert abs(float(noise.float().mean()) - float(images.float().mean())) < 5


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    root = tmp_path_factory.mktemp("judges")
    shards = write_tiny_shards(root / "shards", n=16, size=32)
    common = {
        "backbone": {
            "arch": "vit_demo",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "patch_size": 8,
            "num_register_tokens": 0,
        },
        "image_size": 32,
        "epochs": 30,
        "batch_size": 8,
        "head_lr": 1e-2,
        "backbone_lr": 1e-3,
        "bootstrap": 20,
        "device": "cpu",
    }
    cls = Q.train_classifier(shards, root / "cls", {**common, "findings": ["cardiomegaly"]}, seed=0)
    seg = Q.train_segmenter(shards, root / "seg", common, seed=0)
    return {"root": root, "shards": shards, "cls": cls, "seg": seg}


def test_judges_learn_the_tiny_task_and_reload(judges):
    from cxrfoundry.eval.probe import load_cohort

    root = judges["root"]
    # bright disc = cardiomegaly: trivially separable
    assert judges["cls"]["per_class"]["Cardiomegaly"]["auroc"] > 0.9
    assert judges["seg"]["dice_mean"]["value"] > 0.6
    model, settings = Q.load_judge(root / "cls")
    test = load_cohort(judges["shards"], "test", {"image_size": None, "equalize": False})
    scores = Q.classifier_scores(model, settings, test.images, torch.device("cpu"))
    assert scores.shape == (len(test), 1)
    ext = Q.classifier_features(model, settings, torch.device("cpu"))
    feats = ext(test.images[:4].float().unsqueeze(1) / 255)
    assert feats.shape == (4, ext.num_features)
    seg, ssettings = Q.load_judge(root / "seg")
    masks = Q.segment(seg, ssettings, test.images, torch.device("cpu"))
    assert masks.shape == (len(test), 2, 32, 32) and masks.dtype == torch.bool
    with pytest.raises(FileNotFoundError, match="judge"):
        Q.load_judge(root)


def test_unknown_quality_keys_fail():
    with pytest.raises(ValueError, match="bogus"):
        Q.resolve({"bogus": 1}, Q.QUALITY_DEFAULTS, "chexgen.quality")


def test_nested_settings_merge_with_defaults():
    cfg = Q.resolve({"ms_ssim": {"sigma": 1.0}}, Q.QUALITY_DEFAULTS, "chexgen.quality")
    assert cfg["ms_ssim"] == {**Q.QUALITY_DEFAULTS["ms_ssim"], "sigma": 1.0}
    assert Q.QUALITY_DEFAULTS["ms_ssim"]["sigma"] == 1.5  # defaults untouched
