"""The prototype curator: quantile split, farthest-point cap, EMA + Sinkhorn update, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxrfoundry.train.curator import (
    CENTRAL_DROPPED,
    CENTRAL_KEPT,
    OUTLIER,
    SUPPORT,
    WARMUP,
    CuratorConfig,
    PrototypeCurator,
    farthest_point_sampling,
    joint_embedding,
    sinkhorn,
    split_cluster,
)


def test_split_cluster_quantiles() -> None:
    d = torch.arange(1, 101, dtype=torch.float)  # 1..100
    outlier, support, central = split_cluster(d, 0.85, 0.95)
    # torch.quantile interpolates: q95 = 95.05, q85 = 85.15.
    assert d[outlier].tolist() == list(range(96, 101))
    assert d[support].tolist() == list(range(86, 96))
    assert d[central].tolist() == list(range(1, 86))
    assert int(outlier.sum() + support.sum() + central.sum()) == 100
    one_out, one_sup, one_cen = split_cluster(torch.tensor([0.3]), 0.85, 0.95)
    assert one_cen.tolist() == [True] and not one_out.any() and not one_sup.any()


def test_farthest_point_sampling_spreads() -> None:
    # Two tight groups far apart: 2 picks must take one from each group.
    a = torch.zeros(5, 2) + torch.arange(5).unsqueeze(1) * 1e-3
    b = torch.full((5, 2), 10.0) + torch.arange(5).unsqueeze(1) * 1e-3
    x = torch.cat([a, b])
    pick = farthest_point_sampling(x, 2, start=0)
    assert pick.tolist()[0] == 0 and pick.tolist()[1] >= 5
    # Greedy max-min on a line: 0, then the far end, then the middle.
    line = torch.arange(11, dtype=torch.float).unsqueeze(1)
    assert farthest_point_sampling(line, 3, start=0).tolist() == [0, 10, 5]
    assert farthest_point_sampling(line, 20).tolist() == list(range(11))


def test_sinkhorn_balances() -> None:
    torch.manual_seed(0)
    scores = torch.randn(60, 3) + torch.tensor([3.0, 0.0, 0.0])  # prototype 0 dominates
    q = sinkhorn(scores, epsilon=0.5, iters=20)
    assert torch.allclose(q.sum(1), torch.ones(60), atol=1e-3)
    assert torch.allclose(q.sum(0), torch.full((3,), 20.0), atol=0.5)
    assert scores.argmax(1).bincount(minlength=3)[0] > 40  # unbalanced before


def _clustered(n_per: int, centers: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.cat([c + 0.05 * torch.randn(n_per, c.numel(), generator=g) for c in centers])
    return img, img.clone()  # text = image: the joint space mirrors the clusters


def test_curator_hard_end_to_end() -> None:
    centers = F.normalize(torch.eye(4)[:3] * 5 + 0.1, dim=-1)
    cfg = CuratorConfig(num_prototypes=3, warmup_batches=2, central_cap=4)
    cur = PrototypeCurator(cfg, num_samples=600, seed=0)
    ids = iter(torch.arange(600).split(60))
    for step in range(2):  # warm-up: everything kept
        res = cur.step(*_clustered(20, centers, step), next(ids))
        assert res.keep.all() and (res.category == WARMUP).all()
    assert cur.ready
    # The warm-up batches were curated retroactively.
    assert (cur.category[:120] != WARMUP).all()
    res = cur.step(*_clustered(20, centers, 7), next(ids))
    assert set(res.cluster.unique().tolist()) == {0, 1, 2}
    for c in range(3):
        members = res.cluster == c
        cats = res.category[members]
        assert int((cats == CENTRAL_KEPT).sum()) == 4  # the cap
        assert int((cats == OUTLIER).sum()) == 1  # 20 members: 1 beyond the 95th percentile
        assert int((cats == SUPPORT).sum()) == 2  # and 2 between 85th and 95th
        assert int((cats == CENTRAL_DROPPED).sum()) == 13
        d = res.distance[members]
        assert d[cats == OUTLIER].min() > d[cats == SUPPORT].max()
    assert int(res.keep.sum()) == 3 * 6
    assert torch.equal(res.keep, (res.category == SUPPORT) | (res.category == CENTRAL_KEPT))
    summary = cur.summary()
    assert summary["n_kept"] == int(np.isin(cur.category, (SUPPORT, CENTRAL_KEPT)).sum())
    assert summary["n_unseen"] == 600 - 180


def test_ema_update_moves_prototypes() -> None:
    cfg = CuratorConfig(num_prototypes=1, warmup_batches=1, central_cap=100, ema=0.9)
    cur = PrototypeCurator(cfg, num_samples=100, seed=0)
    base = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=-1)
    cur.step(base.repeat(10, 1), base.repeat(10, 1), torch.arange(10))
    p0 = cur.prototypes.clone()
    target = F.normalize(torch.tensor([[0.0, 1.0, 0.0]]), dim=-1)
    z = target.repeat(10, 1)
    res = cur.step(z, z, torch.arange(10, 20))
    kept = joint_embedding(z, z)[res.keep]
    expected = F.normalize(0.9 * p0[0] + 0.1 * kept.mean(0), dim=-1)
    torch.testing.assert_close(cur.prototypes[0], expected)
    assert not torch.allclose(cur.prototypes, p0)


def test_soft_mode_weights_far_samples() -> None:
    centers = F.normalize(torch.eye(4)[:2] * 5 + 0.1, dim=-1)
    cfg = CuratorConfig(mode="soft", num_prototypes=2, warmup_batches=1)
    cur = PrototypeCurator(cfg, num_samples=200, seed=0)
    cur.step(*_clustered(40, centers, 0), torch.arange(80))
    res = cur.step(*_clustered(40, centers, 1), torch.arange(80, 160))
    kept = res.keep
    assert not res.keep[res.category == OUTLIER].any() and kept.sum() > 60
    assert torch.isclose(res.weights[kept].mean(), torch.tensor(1.0))
    # Farther from the prototype -> larger weight, within each cluster.
    for c in range(2):
        m = kept & (res.cluster == c)
        order = res.distance[m].argsort()
        w = res.weights[m][order]
        assert (w[1:] >= w[:-1] - 1e-6).all() and w[-1] > w[0]


def test_state_roundtrip_is_exact() -> None:
    centers = F.normalize(torch.eye(4)[:3] * 5 + 0.1, dim=-1)
    cfg = CuratorConfig(num_prototypes=3, warmup_batches=1, central_cap=3)
    a = PrototypeCurator(cfg, 300, seed=0)
    a.step(*_clustered(20, centers, 0), torch.arange(60))
    b = PrototypeCurator(cfg, 300, seed=0)
    b.load_state_dict(a.state_dict())
    batch = _clustered(20, centers, 1)
    ra, rb = a.step(*batch, torch.arange(60, 120)), b.step(*batch, torch.arange(60, 120))
    assert torch.equal(ra.keep, rb.keep) and torch.equal(a.prototypes, b.prototypes)
    assert np.array_equal(a.category, b.category)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown keys"):
        CuratorConfig.from_mapping({"num_protos": 3})
    with pytest.raises(ValueError, match="support_quantile"):
        CuratorConfig.from_mapping({"support_quantile": 0.97})
    with pytest.raises(ValueError, match="mode"):
        CuratorConfig.from_mapping({"mode": "fuzzy"})
    with pytest.raises(ValueError, match="fewer than K"):
        PrototypeCurator(CuratorConfig(num_prototypes=6, warmup_batches=1), 10, 0).step(
            torch.randn(3, 4), torch.randn(3, 4), torch.arange(3)
        )
