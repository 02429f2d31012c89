"""Probe, segmentation and synthetic-data utility on tiny shards (cxrfoundry.eval.probe/utility)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cxrfoundry.eval import metrics as M
from cxrfoundry.eval import probe, utility
from tests.unit.eval_shards import TINY_BACKBONE, make_shards


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one torch thread avoids oversubscribing the shared 2-core test machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FINDINGS = ["cardiomegaly", "pleural_effusion"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    real = make_shards(root / "real", {"train": 24, "test": 24})
    synthetic = make_shards(root / "cohort", {"synthetic": 24}, index=False, seed=9, prefix="syn")
    return real, synthetic


def test_load_cohort_and_patient_sampling(shards) -> None:
    real, synthetic = shards
    cfg = probe.resolve_config({})
    test = probe.load_cohort(real, "test", cfg)
    assert len(test) == 48 and test.images.dtype == torch.uint8
    assert test.patient_ids[0] == test.patient_ids[1] == "toytest0"
    assert set(test.sex) <= {"F", "M"} and np.isfinite(test.age).all()
    pool = probe.load_cohort(synthetic, None, cfg, source="synthetic")
    assert len(pool) == 48 and (pool.source == "synthetic").all()
    both = probe.concat_cohorts([test, pool])
    assert len(both) == 96 and both.image_ids[48] == pool.image_ids[0]
    half = probe.sample_patients(test, 0.5, seed=1)
    assert len(half) == 24 and len(set(half.patient_ids)) == 12
    assert half.image_ids == probe.sample_patients(test, 0.5, seed=1).image_ids
    with pytest.raises(FileNotFoundError, match="missing: shard file or folder not found"):
        probe.load_cohort(real / "missing", None, cfg)
    (real.parent / "empty").mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match=r"empty: no index\.json"):
        probe.load_cohort(real.parent / "empty", None, cfg)
    with pytest.raises(ValueError, match="unknown probe config keys"):
        probe.resolve_config({"epoch": 3})


def test_run_probe_writes_contract_and_predictions(shards, tmp_path) -> None:
    real, _ = shards
    out = tmp_path / "rand" / "probe_linear.json"
    rec = probe.run_probe(
        real,
        TINY_BACKBONE,
        out,
        {"epochs": 8, "bootstrap": 200, "findings": FINDINGS},
        seed=0,
        model_name="rand",
        dataset="toy",
        out_predictions=tmp_path / "pred.parquet",
    )
    assert M.read_metrics(out)["value"] == rec["value"]
    first = out.read_bytes()
    probe.run_probe(real, TINY_BACKBONE, out, {"epochs": 8, "bootstrap": 200, "findings": FINDINGS},
                    seed=0, model_name="rand", dataset="toy")  # fmt: skip
    assert out.read_bytes() == first  # bit-identical rerun
    assert rec["task"] == "probe_linear" and rec["n"] == 48 and rec["n_patients"] == 24
    assert set(rec["per_class"]) == {"Cardiomegaly", "Pleural Effusion"}
    assert rec["ci_low"] <= rec["value"] <= rec["ci_high"]
    assert rec["compute"]["eval_flops_per_image"] > 0
    table, columns = probe.read_predictions(tmp_path / "pred.parquet")
    assert columns == FINDINGS and table.num_rows == 48
    # The predictions reproduce the recorded AUROC.
    y = table.column("label.cardiomegaly").to_numpy()
    s = table.column("score.cardiomegaly").to_numpy()
    from sklearn.metrics import roc_auc_score

    assert rec["per_class"]["Cardiomegaly"]["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert pq.read_table(tmp_path / "pred.parquet").column("patient_id")[0].as_py() == "toytest0"


def test_segmentation_heads(shards, tmp_path) -> None:
    real, _ = shards
    model = probe.UNetSegmentationModel(probe.heads.load_backbone(TINY_BACKBONE), 2, [8, 8])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2, 32, 32)
    rec = probe.run_segmentation(
        real,
        TINY_BACKBONE,
        tmp_path / "seg.json",
        {"head": "unet", "epochs": 6, "bootstrap": 100, "decoder_channels": [8]},
        seed=0,
        model_name="rand",
    )
    assert rec["task"] == "seg_unet" and set(rec["per_class"]) == {"lungs", "heart"}
    assert 0 < rec["value"] <= 1 and rec["ci_low"] <= rec["value"] <= rec["ci_high"]
    with pytest.raises(ValueError, match="head must be"):
        probe.run_segmentation(real, TINY_BACKBONE, tmp_path / "x.json", {"head": "fpn"},
                               seed=0, model_name="rand")  # fmt: skip


def test_augmentation_and_pretraining(shards, tmp_path) -> None:
    real, synthetic = shards
    base = {"epochs": 2, "batch_size": 16, "bootstrap": 50, "findings": FINDINGS}
    aug = utility.run_augmentation(
        real,
        synthetic,
        TINY_BACKBONE,
        tmp_path / "augment.json",
        {"seeds": 2, "multiples": [1], "probe": {**base, "mode": "linear"}},
        seed=0,
        model_name="rand",
    )
    assert [r["arm"] for r in aug["runs"]] == ["real", "real+1x"] * 2
    assert {r["n_synthetic"] for r in aug["runs"]} == {0, 48}
    comp = aug["comparisons"]["real+1x"]
    assert len(comp["diffs"]) == 2 and aug["value"] == pytest.approx(np.mean(comp["diffs"]))
    assert {"t_pvalue", "wilcoxon_pvalue"} <= set(comp)
    pre = utility.run_pretraining(
        real,
        synthetic,
        TINY_BACKBONE,
        tmp_path / "pretrain.json",
        {"fractions": [0.25, 1.0], "probe": {**base, "mode": "finetune"}},
        seed=0,
        model_name="rand",
    )
    fractions = {(r["arm"], r["fraction"]): r["n_real"] for r in pre["runs"]}
    assert fractions[("real only", 0.25)] == 12 and fractions[("synthetic pretrain", 1.0)] == 48
    assert pre["n_synthetic_pretrain"] == 48
    assert set(pre["differences"]) == {"0.25", "1"}
    M.read_metrics(tmp_path / "pretrain.json")


def test_cached_features_give_the_same_classifier(shards) -> None:
    """A linear probe on features cached on the cohort equals one that embeds every time."""
    real, _ = shards
    cfg = {"epochs": 3, "batch_size": 16, "findings": FINDINGS, "mode": "linear"}
    pcfg = probe.resolve_config(cfg)
    train = probe.load_cohort(real, "train", pcfg)
    test = probe.load_cohort(real, "test", pcfg)
    plain = probe.Classifier(TINY_BACKBONE, cfg, seed=3)
    plain.fit(train)
    expected = plain.predict(test)
    cached = probe.Classifier(TINY_BACKBONE, cfg, seed=3)
    assert cached.key == plain.key  # same random init, same fingerprint
    cached.with_features(train)
    cached.with_features(test)
    half = train.subset(np.arange(0, len(train), 2))
    both = probe.concat_cohorts([train, half])
    assert half.features[cached.key].shape[0] == len(half)
    assert torch.equal(both.features[cached.key][len(train) :], half.features[cached.key])
    cached.fit(train)
    assert np.allclose(cached.predict(test), expected, atol=1e-6)
    # Another random init has another fingerprint: its fits never see these features.
    other = probe.Classifier(TINY_BACKBONE, cfg, seed=4)
    assert other.key != cached.key and other._cached(test) is None
    assert probe.Classifier(TINY_BACKBONE, cfg, seed=4, backbone_seed=3).key == cached.key
    with pytest.raises(ValueError, match="frozen backbone"):
        probe.Classifier(TINY_BACKBONE, {**cfg, "mode": "finetune"}).with_features(test)


def test_dino_stage_records_share_the_benchmark_implementation(shards, tmp_path) -> None:
    """finetune_cls / finetune_seg (DINO stage) = classification/segmentation_benchmark."""
    from cxrfoundry.train import finetune

    real, _ = shards
    cfg = {"epochs": 3, "batch_size": 16, "head_lr": 1e-2, "backbone_lr": 0.0, "bootstrap": 60,
           "findings": FINDINGS}  # fmt: skip
    cls = finetune.finetune_classification(real, TINY_BACKBONE, tmp_path / "cls.json", cfg,
                                           seed=0, model_name="rand")  # fmt: skip
    run = probe.classification_benchmark(real, TINY_BACKBONE, {**cfg, "mode": "linear"}, seed=0)
    assert cls["value"] == pytest.approx(run.result.macro_auroc.value)
    assert cls["per_class"]["Cardiomegaly"] == pytest.approx(run.result.auroc["Cardiomegaly"].value)
    assert cls["n_patients"] == 24 and cls["details"]["mode"] == "linear"
    assert len(cls["details"]["bootstrap_replicates"]) == 60
    seg = finetune.finetune_segmentation(
        real, TINY_BACKBONE, tmp_path / "seg.json",
        {"epochs": 2, "batch_size": 16, "backbone_lr": 0.0, "bootstrap": 30}, seed=0,
        model_name="rand",
    )  # fmt: skip
    assert seg["task"] == "seg" and set(seg["per_class"]) == {"lungs", "heart"}
    assert seg["ci_low"] <= seg["value"] <= seg["ci_high"]
    assert len(seg["details"]["bootstrap_replicates"]) == 30
