"""Fairness audit (cxrfoundry.eval.fairness): subgroups, planted bias, correlation, balancing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxrfoundry.eval import fairness as FA
from cxrfoundry.eval import metrics as M
from tests.unit.eval_shards import TINY_BACKBONE, make_shards


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one torch thread avoids oversubscribing the shared 2-core test machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_age_bins_and_subgroup_labels() -> None:
    ages = np.array([18, 19, 40, 40.5, 41, 65, 66, 95, np.nan])
    assert FA.age_groups(ages).tolist() == [
        "", "19-40", "19-40", "19-40", "41-65", "41-65", "66+", "66+", "",
    ]  # fmt: skip
    groups = FA.subgroup_labels(
        {
            "sex": np.array(["F", "M", "", "F"], object),
            "age": np.array([30, 70, 50, np.nan]),
            "race": np.array(["Black", "Unknown", "White", None], object),
        }
    )
    assert groups["race"].tolist() == ["Black", "", "White", ""]
    assert groups["sex&age"].tolist() == ["F&19-40", "M&66+", "", ""]
    assert groups["race&age"].tolist() == ["Black&19-40", "", "White&41-65", ""]


def _cohort(seed: int, n_pat: int, noise_f: float, noise_m: float = 0.5):
    """Scores whose separation is worse for women (``noise_f`` > ``noise_m``)."""
    rng = np.random.default_rng(seed)
    sex = np.where(rng.random(n_pat) < 0.5, "F", "M").astype(object)
    age = rng.integers(20, 90, n_pat).astype(float)
    race = rng.choice(np.array(["White", "Black", "Asian"], object), n_pat)
    # Two films per patient.
    pid = np.repeat(np.arange(n_pat), 2)
    sex, age, race = sex[pid], age[pid], race[pid]
    y = rng.random((2 * n_pat, 3)) < 0.35
    noise = np.where(sex == "F", noise_f, noise_m)[:, None]
    scores = y + rng.normal(0, 1, y.shape) * noise
    groups = FA.subgroup_labels({"sex": sex, "age": age, "race": race})
    return scores, y, pid, groups


def test_audit_detects_planted_bias_and_not_a_null_one() -> None:
    scores, y, pid, groups = _cohort(0, 300, noise_f=1.6)
    audit = FA.subgroup_audit(scores, y, pid, groups, n_boot=500, seed=0)
    gap = audit.gaps["sex"]
    assert gap["worst_group"] == "F" and gap["best_group"] == "M"
    assert gap["gap"] > 0.1 and gap["gap_ci"][0] > 0  # detected: CI excludes 0
    f = next(r for r in audit.rows if r["attribute"] == "sex" and r["group"] == "F")
    assert f["n"] == 2 * f["n_patients"] and f["ci_low"] < f["value"] < f["ci_high"]
    # Intersections exist; tiny ones are listed without a value.
    assert any(r["attribute"] == "sex&race" for r in audit.rows)
    small = FA.subgroup_audit(scores[:40], y[:40], pid[:40], {"sex": groups["sex"][:40]},
                              min_patients=15, n_boot=50)  # fmt: skip
    assert all(r["value"] is None for r in small.rows) and "sex" not in small.gaps
    # Without a planted bias the sex gap is not significant.
    scores0, y0, pid0, groups0 = _cohort(1, 300, noise_f=0.5)
    null = FA.subgroup_audit(scores0, y0, pid0, groups0, n_boot=500, seed=0)
    assert null.gaps["sex"]["gap_ci"][0] < 0 < null.gaps["sex"]["gap_ci"][1]


def test_correlation_real_vs_synthetic() -> None:
    # Bias on several attributes so subgroup values spread; the "synthetic" cohort shares it.
    def audit(seed: int) -> FA.SubgroupAudit:
        rng = np.random.default_rng(seed)
        n = 1500
        sex = np.where(rng.random(n) < 0.5, "F", "M").astype(object)
        age = rng.integers(20, 90, n).astype(float)
        race = rng.choice(np.array(["White", "Black", "Asian"], object), n)
        noise = 0.5 + 0.8 * (sex == "F") + 0.6 * (race == "Black") + 0.01 * (age - 20)
        y = rng.random((n, 2)) < 0.4
        s = y + rng.normal(0, 1, y.shape) * noise[:, None]
        groups = FA.subgroup_labels({"sex": sex, "age": age, "race": race}, intersections=())
        return FA.subgroup_audit(s, y, np.arange(n), groups, n_boot=100, seed=seed)

    corr = FA.correlate_audits(audit(10), audit(11))
    assert corr["n_groups"] == 8 and corr["pearson_r"] > 0.75
    assert corr["same_worst_group"]["sex"] and corr["same_worst_group"]["race"]
    assert len(corr["pairs"]) == 8


def test_balance_plan_and_selection() -> None:
    train = np.array(["F"] * 3 + ["M"] * 10 + [""] * 4, dtype=object)
    plan = FA.balance_plan(train)
    assert plan == {"F": 7, "M": 0}
    pool = np.array(["F"] * 5 + ["M"] * 20, dtype=object)
    idx, report = FA.select_balancing(pool, plan, seed=0)
    assert len(idx) == 5 and (pool[idx] == "F").all()  # a shortfall takes what exists
    assert report["F"] == {"wanted": 7, "available": 5, "taken": 5}
    again, _ = FA.select_balancing(pool, plan, seed=0)
    np.testing.assert_array_equal(idx, again)


def test_run_fairness_end_to_end(tmp_path) -> None:
    kw = {"bias": {"F": 0.2}, "size": 32}
    real = make_shards(tmp_path / "real", {"train": 24, "test": 30}, female_fraction=0.3, **kw)
    syn_test = make_shards(
        tmp_path / "syn_test", {"synthetic": 30}, index=False, seed=3, prefix="s", **kw
    )
    syn_train = make_shards(
        tmp_path / "syn_train", {"synthetic": 30}, index=False, seed=4, prefix="t",
        female_fraction=0.9, **kw,
    )  # fmt: skip
    cfg = {
        "probe": {"epochs": 8, "bootstrap": 200, "findings": ["cardiomegaly", "pleural_effusion"]},
        "min_patients": 5,
        "balance": ["sex"],
        "intersections": [["sex", "age"]],
    }
    out = tmp_path / "bench" / "rand" / "fairness.json"
    rec = FA.run_fairness(
        real, TINY_BACKBONE, out, cfg, seed=0, model_name="rand",
        synthetic_test=syn_test, synthetic_train=syn_train,
    )  # fmt: skip
    assert M.read_metrics(out) == json.loads(out.read_text())
    assert rec["task"] == "fairness" and rec["metric"] == "auroc_gap_sex"
    assert rec["value"] == pytest.approx(rec["gaps"]["sex"]["gap"])
    assert {"sex=F", "sex=M"} <= set(rec["per_class"])
    assert any(k.startswith("sex&age=") for k in rec["per_class"])
    assert rec["correlation"]["n_groups"] >= 4
    mit = rec["mitigation"]["sex"]
    assert mit["added"]["F"]["taken"] > 0
    assert mit["n_train_after"] == rec["details"]["n_train"] + mit["added"]["F"]["taken"]
    assert {"gap_before", "gap_after", "worst_before", "worst_after"} <= set(mit)
    low, high = mit["gap_change_ci"]
    assert low <= mit["gap_before"] - mit["gap_after"] <= high


def test_gap_change_ci_pairs_the_replicates() -> None:
    rng = np.random.default_rng(5)
    n = 400
    sex = np.where(rng.random(n) < 0.5, "F", "M").astype(object)
    y = rng.random((n, 2)) < 0.4
    noise = rng.normal(0, 1, y.shape)
    before = y + noise * np.where(sex == "F", 2.0, 0.5)[:, None]  # women far noisier
    after = y + noise * np.where(sex == "F", 0.7, 0.5)[:, None]  # the gap mostly closed
    kw = {"min_patients": 5, "n_boot": 300, "seed": 1}
    a = FA.subgroup_audit(before, y, np.arange(n), {"sex": sex}, **kw)
    b = FA.subgroup_audit(after, y, np.arange(n), {"sex": sex}, **kw)
    low, high = FA.gap_change_ci(a, b, "sex")
    assert 0 < low <= a.gaps["sex"]["gap"] - b.gaps["sex"]["gap"] <= high
    assert FA.gap_change_ci(a, b, "age") == [None, None]


def test_race_vocabularies_map_to_one_group() -> None:
    values = ["WHITE", "White", "BLACK/AFRICAN AMERICAN", "Black", "HISPANIC/LATINO", "Asian",
              "UNKNOWN", None, "PATIENT DECLINED", "Martian"]  # fmt: skip
    assert [FA.normalize_race(v) for v in values] == [
        "White", "White", "Black", "Black", "Hispanic", "Asian", "", "", "", "Martian"
    ]  # fmt: skip
    groups = FA.subgroup_labels({"sex": ["F"] * 3, "age": [30, 50, 70], "race": values[:3]})
    assert list(groups["race"]) == ["White", "White", "Black"]
