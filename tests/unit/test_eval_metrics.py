"""Patient-bootstrap metrics and the metrics JSON contract (cxrfoundry.eval.metrics)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrfoundry.eval import metrics as M


def test_weighted_metrics_match_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = np.round(rng.normal(y * 1.0, 1.0), 1)  # rounding makes many ties
    w = rng.integers(0, 4, size=(6, 200)).astype(float)
    expected_au = [roc_auc_score(y, s, sample_weight=wi) for wi in w]
    expected_ap = [average_precision_score(y, s, sample_weight=wi) for wi in w]
    np.testing.assert_allclose(M.weighted_auroc(s, y, w), expected_au, rtol=1e-12)
    np.testing.assert_allclose(M.weighted_ap(s, y, w), expected_ap, rtol=1e-12)
    # A replicate with no positives is undefined, not an error.
    assert np.isnan(M.weighted_auroc(s, y, (~y)[None].astype(float)))[0]


def test_patient_weights_resample_whole_patients() -> None:
    patients = np.repeat([f"p{i}" for i in range(30)], 3)[::-1]
    blocks = list(M.patient_weights(patients, 50, seed=1, chunk=7))
    w = np.concatenate(blocks)
    assert w.shape == (50, 90)
    # Every image of a patient carries the patient's multiplicity ...
    for p in np.unique(patients):
        cols = w[:, patients == p]
        assert (cols == cols[:, :1]).all()
    # ... and each replicate draws exactly as many patients as there are.
    assert (w.sum(axis=1) == 90).all()
    # Deterministic for a seed, whatever the chunking; another seed differs.
    again = np.concatenate(list(M.patient_weights(patients, 50, seed=1, chunk=50)))
    np.testing.assert_array_equal(w, again)
    other = np.concatenate(list(M.patient_weights(patients, 50, seed=2)))
    assert not np.array_equal(w, other)
    with pytest.raises(ValueError, match="missing"):
        next(M.patient_weights(["a", None], 5, seed=0))


def test_bootstrap_ci_covers_the_true_auroc() -> None:
    # Binormal model: AUROC = Phi(d / sqrt(2)). 95% CIs should cover it ~95% of the time.
    d, trials, hits = 1.0, 120, 0
    truth = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(42)
    for t in range(trials):
        y = rng.random(120) < 0.4
        s = rng.normal(d * y, 1.0)
        res = M.classification_metrics(s, y, np.arange(120), n_boot=500, seed=t)
        est = res.auroc["class_0"]
        hits += est.ci_low <= truth <= est.ci_high
    coverage = hits / trials
    assert 0.86 <= coverage <= 0.995, coverage


def test_patient_resampling_widens_ci_for_repeated_images() -> None:
    rng = np.random.default_rng(3)
    n_pat = 80
    y = rng.random(n_pat) < 0.5
    s = rng.normal(0.8 * y, 1.0)
    # Four identical films per patient: only 80 independent observations.
    ys, ss = np.repeat(y, 4), np.repeat(s, 4)
    by_patient = M.classification_metrics(ss, ys, np.repeat(np.arange(n_pat), 4), seed=0)
    by_image = M.classification_metrics(ss, ys, np.arange(4 * n_pat), seed=0)
    dedup = M.classification_metrics(s, y, np.arange(n_pat), seed=0)

    def width(r: M.ClassificationResult) -> float:
        return r.macro_auroc.ci_high - r.macro_auroc.ci_low

    assert by_patient.macro_auroc.value == pytest.approx(dedup.macro_auroc.value)
    assert width(by_patient) == pytest.approx(width(dedup), rel=0.25)
    assert width(by_patient) > 1.5 * width(by_image)
    assert by_patient.n == 320 and by_patient.n_patients == 80


def test_classification_metrics_macro_valid_mask_and_errors() -> None:
    rng = np.random.default_rng(5)
    n = 150
    labels = np.stack([rng.random(n) < 0.3, rng.random(n) < 0.4, np.zeros(n, bool)], axis=1)
    scores = rng.normal(labels * 1.5, 1.0)
    valid = np.ones_like(labels)
    valid[:20, 0] = False
    res = M.classification_metrics(
        scores, labels, np.arange(n) // 2, valid=valid, class_names=["a", "b", "c"], n_boot=200
    )
    assert res.auroc["c"].value is None  # one class only: not scored, not in the macro
    expected_a = roc_auc_score(labels[20:, 0], scores[20:, 0])
    assert res.auroc["a"].value == pytest.approx(expected_a)
    assert res.macro_auroc.value == pytest.approx((expected_a + res.auroc["b"].value) / 2)
    assert res.macro_auroc.ci_low < res.macro_auroc.value < res.macro_auroc.ci_high
    assert res.per_class()["a"]["n_pos"] == int(labels[20:, 0].sum())
    with pytest.raises(ValueError, match="shape"):
        M.classification_metrics(scores, labels[:, :2], np.arange(n))
    with pytest.raises(ValueError, match="patient ids"):
        M.classification_metrics(scores, labels, np.arange(n - 1))


def test_dice_and_paired_difference() -> None:
    rng = np.random.default_rng(8)
    dice = np.clip(rng.normal([0.9, 0.8], 0.05, size=(60, 2)), 0, 1)
    res = M.dice_metrics(dice, np.arange(60) // 3, ["lungs", "heart"], n_boot=300)
    assert res.per_structure["lungs"].value == pytest.approx(dice[:, 0].mean())
    assert res.mean.value == pytest.approx(dice.mean())
    assert (
        res.per_structure["heart"].ci_low < dice[:, 1].mean() < res.per_structure["heart"].ci_high
    )
    y = rng.random((200, 2)) < 0.4
    good, bad = rng.normal(2.0 * y, 1.0), rng.normal(0.3 * y, 1.0)
    diff = M.paired_difference(good, bad, y, np.arange(200), n_boot=300)
    assert diff["value"] > 0 and diff["ci_low"] > 0 and diff["p_boot"] < 0.01


def test_metrics_json_contract(tmp_path) -> None:
    est = M.Estimate(0.8, 0.7, 0.9)
    rec = M.metrics_record(
        task="probe_linear",
        model="dino",
        dataset="demo",
        metric="auroc_macro",
        estimate=est,
        n=10,
        per_class={"Cardiomegaly": {"auroc": np.float64(0.8), "auprc": float("nan")}},
        compute={"pretrain_flops": 1e12},
        samples_seen=np.int64(100),
    )
    path = tmp_path / "dino" / "probe_linear.json"
    M.write_metrics(path, rec)
    back = json.loads(path.read_text())
    assert list(back)[:0] == [] and set(M.REQUIRED_KEYS) <= set(back)
    assert back["per_class"]["Cardiomegaly"]["auprc"] is None  # nan -> null
    assert back["samples_seen"] == 100 and M.read_metrics(path) == back
    with pytest.raises(ValueError, match="replace contract keys"):
        M.metrics_record(
            task="t", model="m", dataset="d", metric="x", estimate=est, n=1, per_class={}, value=1
        )
    broken = dict(back)
    del broken["ci_low"]
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"bad\.json: missing keys \['ci_low'\]"):
        M.read_metrics(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="ci_low"):
        M.validate_record({**back, "ci_low": 0.95})
    with pytest.raises(ValueError, match="'n'"):
        M.validate_record({**back, "n": -1})
