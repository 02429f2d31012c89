"""DINO/iBOT/KoLeo losses, teacher centering and the backbone builder."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModel, Dinov2Config, Dinov2Model

from cxrfoundry.models.dino import DinoStudent, ProjectionHead, build_backbone, num_prefix_tokens
from cxrfoundry.models.dino_losses import (
    Centering,
    dino_loss,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
)

from .dino_shards import one_torch_thread  # noqa: F401 (autouse fixture)

TINY = {
    "arch": "vit_demo",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 8,
    "image_size": 32,
}


def test_sinkhorn_balances_prototypes() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 16) * 0.3 + torch.linspace(0, 0.5, 16)  # skewed to high ids
    q = sinkhorn_knopp(logits, temperature=0.1, n_iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    assert torch.allclose(q.sum(dim=0), torch.full((16,), 64 / 16), rtol=0.05)
    plain = torch.softmax(logits / 0.1, dim=1).sum(dim=0)
    assert plain.std() > q.sum(dim=0).std() * 10
    assert sinkhorn_knopp(torch.empty(0, 16), 0.1).shape == (0, 16)


def test_ema_centering_update_and_targets() -> None:
    center = Centering(4, "ema", momentum=0.9, init="zero")
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 2.0]])
    center.update(logits)
    assert torch.allclose(center.center, torch.tensor([[0.2, 0.0, 0.0, 0.1]]))
    center.update(torch.empty(0, 4))  # nothing to average: unchanged
    assert torch.allclose(center.center, torch.tensor([[0.2, 0.0, 0.0, 0.1]]))
    targets = center.targets(logits, 0.5)
    expected = torch.softmax((logits - center.center) / 0.5, dim=1)
    assert torch.allclose(targets, expected)
    sk = Centering(4, "sinkhorn").targets(logits, 0.5)
    assert torch.allclose(sk.sum(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="centering"):
        Centering(4, "kmeans")


def test_first_batch_center_init() -> None:
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 2.0]])
    center = Centering(4, "ema", momentum=0.9)
    assert not center.state_dict()["initialized"]  # carried by checkpoints
    targets = center.targets(logits, 0.5)
    mean = logits.mean(dim=0, keepdim=True)
    assert torch.allclose(center.center, mean)  # centred before first use, not against zero
    assert torch.allclose(targets, torch.softmax((logits - mean) / 0.5, dim=1))
    center.update(logits * 2)  # later batches: plain EMA
    assert torch.allclose(center.center, 0.9 * mean + 0.1 * 2 * mean)
    empty = Centering(4, "ema")
    empty.update(torch.empty(0, 4))  # an empty first batch does not count as the first
    assert not empty.initialized and torch.equal(empty.center, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="center init"):
        Centering(4, "ema", init="ones")


def test_dino_loss_pairs_and_minimum() -> None:
    torch.manual_seed(0)
    b, k = 4, 8
    teacher = torch.softmax(torch.randn(2 * b, k), dim=1)
    student = torch.randn(2 * b, k)
    local = torch.randn(3 * b, k)
    loss = dino_loss(teacher, student, local, n_global=2, student_temperature=0.1)
    # 2 teachers × (1 other global + 3 locals) = 8 pairs.
    manual, t, s = 0.0, teacher.chunk(2), list(student.chunk(2)) + list(local.chunk(3))
    for ti in range(2):
        for si in range(5):
            if si != ti:
                manual += -(t[ti] * torch.log_softmax(s[si] / 0.1, dim=1)).sum(1).mean()
    assert torch.allclose(loss, manual / 8)
    # A student that predicts the swapped teacher exactly reaches the teacher entropy.
    one_hot = torch.eye(k)[torch.arange(b) % k]
    t2 = torch.cat([one_hot, one_hot])
    perfect = dino_loss(t2, torch.cat([one_hot, one_hot]) * 100, None, n_global=2)
    assert perfect < 1e-3


def test_ibot_loss_weights_images_equally() -> None:
    masks = torch.tensor([[True, False, False, False], [True, True, True, False], [False] * 4])
    n = int(masks.sum())
    teacher = torch.softmax(torch.randn(n, 5), dim=1)
    student = torch.randn(n, 5)
    loss = ibot_loss(teacher, student, masks, student_temperature=0.1)
    ce = -(teacher * torch.log_softmax(student / 0.1, dim=1)).sum(1)
    expected = (ce[0] + ce[1:4].mean()) / 3  # 3 images, the unmasked one contributes 0
    assert torch.allclose(loss, expected)


def test_koleo_prefers_spread_features() -> None:
    clustered = torch.randn(16, 8) * 0.01 + torch.ones(8)
    spread = torch.randn(16, 8)
    assert koleo_loss(spread) < koleo_loss(clustered)
    x = spread.clone().requires_grad_(True)
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all()


def test_head_outputs_cosines() -> None:
    head = ProjectionHead(32, 10, hidden_dim=16, bottleneck_dim=8)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 10) and out.abs().max() <= 1 + 1e-5
    assert head(torch.empty(0, 32)).shape == (0, 10)


def test_random_backbone_with_registers() -> None:
    model = build_backbone({**TINY, "num_register_tokens": 4}, seed=3)
    assert num_prefix_tokens(model) == 5
    regs = model.embeddings.register_tokens
    assert regs.shape == (1, 4, 32) and regs.std() > 0  # distinct, not the zero HF init
    again = build_backbone({**TINY, "num_register_tokens": 4}, seed=3)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )
    out = model(pixel_values=torch.randn(2, 3, 48, 48))  # other sizes interpolate positions
    assert out.last_hidden_state.shape == (2, 5 + 36, 32)
    stock = build_backbone({**TINY, "num_register_tokens": 0}, seed=0)
    assert num_prefix_tokens(stock) == 1
    with pytest.raises(ValueError, match="arch"):
        build_backbone({"arch": "vit_huge_plus"})


def test_continual_pretraining_adds_registers(tmp_path) -> None:
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(tmp_path / "stock")
    stock = Dinov2Model.from_pretrained(tmp_path / "stock")
    model = build_backbone({"pretrained": str(tmp_path / "stock"), "num_register_tokens": 4})
    assert model.config.num_register_tokens == 4
    weight = "encoder.layer.1.mlp.fc1.weight"
    assert torch.equal(model.state_dict()[weight], stock.state_dict()[weight])
    model.save_pretrained(tmp_path / "with_regs")
    loaded = AutoModel.from_pretrained(tmp_path / "with_regs")
    assert type(loaded).__name__ == "Dinov2WithRegistersModel"
    assert torch.equal(loaded.embeddings.register_tokens, model.embeddings.register_tokens)
    same = build_backbone({"pretrained": str(tmp_path / "with_regs")})
    assert same.config.num_register_tokens == 4
    with pytest.raises(ValueError, match="register tokens"):
        build_backbone({"pretrained": str(tmp_path / "with_regs"), "num_register_tokens": 2})


def test_student_forward_selects_masked_patches() -> None:
    backbone = build_backbone({**TINY, "num_register_tokens": 2}, seed=0)
    student = DinoStudent(backbone, ProjectionHead(32, 6, hidden_dim=8, bottleneck_dim=4),
                          ProjectionHead(32, 7, hidden_dim=8, bottleneck_dim=4))  # fmt: skip
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[0, :3] = True
    out = student(torch.randn(4, 3, 32, 32), masks, torch.randn(6, 3, 16, 16))
    assert out["global_logits"].shape == (4, 6)
    assert out["patch_logits"].shape == (3, 7)
    assert out["local_logits"].shape == (6, 6)
    # With no masked patch the iBOT head still joins the graph (DDP needs every parameter).
    empty = student(torch.randn(4, 3, 32, 32), torch.zeros(4, 16, dtype=torch.bool))
    (empty["global_logits"].sum() + empty["patch_logits"].sum()).backward()
    assert student.ibot_head.prototypes.grad is not None
    assert not math.isnan(float(student.ibot_head.prototypes.grad.sum()))
