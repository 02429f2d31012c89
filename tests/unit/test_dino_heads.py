"""Classification/segmentation heads on any backbone, metrics, CheXmask RLE (eval.heads)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTModel

from cxrfoundry.eval import heads
from cxrfoundry.train.finetune import finetune_classification, finetune_segmentation

from .dino_shards import make_shards, one_torch_thread  # noqa: F401 (autouse fixture)

TINY = {
    "arch": "vit_demo",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 8,
    "image_size": 32,
    "num_register_tokens": 2,
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("heads") / "shards", {"train": 48, "test": 24})


def test_rle_round_trip_and_errors() -> None:
    rng = np.random.default_rng(0)
    mask = (rng.random((7, 9)) > 0.6).astype(np.uint8)
    assert np.array_equal(heads.decode_rle(heads.encode_rle(mask), 7, 9), mask)
    assert heads.decode_rle("1 3 10 2", 3, 4).reshape(-1).tolist() == [1, 1, 1, 0] + [0] * 5 + [
        1,
        1,
        0,
    ]
    with pytest.raises(ValueError, match="odd"):
        heads.decode_rle("1 2 3", 3, 4)
    with pytest.raises(ValueError, match="outside"):
        heads.decode_rle("11 5", 3, 4)


def test_features_on_dino_and_vit_towers(tmp_path) -> None:
    dino = heads.load_backbone(TINY, seed=0)
    cls, patches, grid = heads.BackboneFeatures(dino)(torch.randn(2, 3, 32, 32))
    assert cls.shape == (2, 2, 32) and patches.shape == (2, 16, 32) and grid == (4, 4)
    # A CLIP-style ViT image tower saved with save_pretrained, at another input size.
    ViTModel(
        ViTConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                  image_size=32, patch_size=8),
        add_pooling_layer=False,
    ).save_pretrained(tmp_path / "vision")  # fmt: skip
    tower = heads.load_backbone(tmp_path / "vision")
    model = heads.ClassificationModel(tower, n_classes=5)
    assert model.head.in_features == 24 * 4  # 3 blocks available + mean patch token
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 5)
    seg = heads.SegmentationModel(tower, 2)
    assert seg(torch.randn(1, 3, 48, 48)).shape == (1, 2, 48, 48)


def test_metrics() -> None:
    labels = np.array([[0, 1], [1, 1], [0, 1], [1, 1]])
    scores = np.array([[0.1, 0.5], [0.9, 0.2], [0.2, 0.3], [0.8, 0.9]])
    per = heads.auroc_per_class(scores, labels)
    assert per == [1.0, None]  # the second class has no negatives
    assert heads.mean_auroc(scores, labels) == 1.0
    valid = np.array([[True, True], [False, True], [True, True], [True, True]])
    assert heads.auroc_per_class(scores, labels, valid)[0] == 1.0
    pred = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    target = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    pred[0, 0, :2], target[0, 0, 1:3] = True, True
    dice = heads.dice_per_image(pred, target)
    assert torch.allclose(dice, torch.tensor([[0.5, 1.0]], dtype=torch.float64))
    low, high = heads.bootstrap_ci(lambda idx: float(np.mean(idx)), 50, n_boot=100)
    assert low < 24.5 < high


def test_paired_bootstrap_sees_a_consistent_gain() -> None:
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 1, 200)  # shared per-image noise dominates both models' scores
    a, b = difficulty + 0.1, difficulty

    def reps(x):
        return heads.bootstrap_replicates(lambda idx: float(x[idx].mean()), 200, seed=3)

    ra, rb = reps(a), reps(b)
    assert len(ra) == 200 and heads.percentile_ci(ra)[0] < heads.percentile_ci(rb)[1]  # overlap
    low, high = heads.paired_ci(ra, rb)
    assert 0.099 < low <= high < 0.101  # same resamples: the shared noise cancels
    assert heads.bootstrap_replicates(lambda idx: None, 10, n_boot=3) == [None] * 3
    with pytest.raises(ValueError, match="unpaired"):
        heads.paired_ci(ra, rb[:-1])


def test_finetune_classification_writes_benchmark_json(tmp_path, shards) -> None:
    out = tmp_path / "cls.json"
    cfg = {"epochs": 6, "batch_size": 16, "head_lr": 1e-2, "backbone_lr": 1e-4, "bootstrap": 20}
    result = finetune_classification(shards, TINY, out, cfg, seed=0, model_name="toy")
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    expected = {"task", "model", "dataset", "metric", "value", "ci_low", "ci_high", "n"}
    assert expected <= set(saved) and "per_class" in saved
    assert saved["task"] == "cls" and saved["n"] == 24 and saved["dataset"] == "shards"
    assert saved["per_class"]["Pneumonia"] is None  # never positive in the toy data
    assert saved["per_class"]["Cardiomegaly"] > 0.75  # heart size is plainly visible
    assert saved["ci_low"] <= saved["value"] <= saved["ci_high"]
    with pytest.raises(ValueError, match="unknown finetune_cls config keys"):
        finetune_classification(shards, TINY, out, {"epoch": 1}, seed=0, model_name="toy")


def test_finetune_segmentation_learns_masks(tmp_path, shards) -> None:
    cfg = {"epochs": 8, "batch_size": 16, "head_lr": 2e-2, "backbone_lr": 1e-3, "bootstrap": 0}
    result = finetune_segmentation(shards, TINY, tmp_path / "seg.json", cfg, seed=0, model_name="t")
    assert result["task"] == "seg" and set(result["per_class"]) == {"lungs", "heart"}
    assert result["per_class"]["lungs"] > 0.6
    assert result["ci_low"] is None  # bootstrap switched off
