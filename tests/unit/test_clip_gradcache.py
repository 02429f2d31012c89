"""GradCache and the contrastive loss: gradients equal full-batch gradients.

Tolerances. In float64 the two paths agree to ``rtol=1e-7, atol=1e-10`` (element-wise); in
float32 to ``1e-5 × the largest |gradient| of each tensor`` (the paths differ only in the
summation order of per-micro-batch contributions, and gradients here reach ~50 because the
logit scale starts at 100).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cxrfoundry.models.clip import CLIPModel, pool_text, select_sections
from cxrfoundry.models.losses import clip_loss, gathered_clip_loss
from cxrfoundry.train.gradcache import contrastive_backward

from .clip_shards import TINY_MODEL

RTOL, ATOL = 1e-7, 1e-10
REPORTS = [
    "Cardiomegaly is present.",
    "No cardiomegaly. No pleural effusion.",
    "There is a pneumothorax.",
    "No pneumothorax.",
    "There is a pleural effusion. Cardiomegaly is present.",
    "The heart size is normal.",
    "No acute findings.",
    "There is a pneumothorax. There is a pleural effusion.",
]


@pytest.fixture(scope="module")
def model() -> CLIPModel:
    torch.manual_seed(0)
    # float64 so the comparison is tight; eval: dropout off, so both paths see the same net.
    return CLIPModel(TINY_MODEL).double().eval()


def _batch(model: CLIPModel) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(len(REPORTS), 1, 32, 32, generator=g)
    pixels = model.preprocess_images(pixels).to(model.visual_projection.weight.dtype)
    return {"pixel_values": pixels, **model.tokenize(REPORTS)}


def _grads(model: CLIPModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model: CLIPModel, micro: int | None, keep: torch.Tensor | None = None):
    model.zero_grad(set_to_none=True)

    def loss_fn(i, t, s):
        return gathered_clip_loss(i, t, s, keep=keep)

    loss, _, _ = contrastive_backward(model, _batch(model), loss_fn, micro_batch_size=micro)
    return loss, _grads(model)


@pytest.mark.parametrize("micro", [3])
def test_gradcache_equals_full_batch(model: CLIPModel, micro: int) -> None:
    ref_loss, ref = _run(model, None)
    loss, got = _run(model, micro)
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    assert (
        set(got) == set(ref)
        and "logit_scale" in ref
        and "text.embeddings.word_embeddings.weight" in ref
    )
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=RTOL, atol=ATOL, msg=name)
    # The test can fail: an accumulation that drops cross-micro-batch negatives differs.
    assert any((g.abs() > 0).any() for g in ref.values())


def test_gradcache_with_kept_subset(model: CLIPModel) -> None:
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    ref_loss, ref = _run(model, None, keep)
    loss, got = _run(model, 3, keep)
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=RTOL, atol=ATOL, msg=name)


def test_gradcache_float32_tolerance() -> None:
    torch.manual_seed(0)
    model = CLIPModel(TINY_MODEL).eval()
    _, ref = _run(model, None)
    _, got = _run(model, 3)
    for name in ref:
        bound = 1e-5 * float(ref[name].abs().max()) + 1e-7
        assert float((got[name] - ref[name]).abs().max()) <= bound, name


def test_naive_accumulation_differs(model: CLIPModel) -> None:
    """Sanity: plain gradient accumulation (per-micro-batch loss) is not the same objective."""
    _, ref = _run(model, None)
    model.zero_grad(set_to_none=True)
    batch = _batch(model)
    for s in range(0, 8, 4):
        i, t, sc = model(**{k: v[s : s + 4] for k, v in batch.items()})
        (clip_loss(i, t, sc) / 2).backward()
    naive = _grads(model)
    assert not torch.allclose(
        naive["visual_projection.weight"], ref["visual_projection.weight"], rtol=RTOL, atol=ATOL
    )


def test_clip_loss_properties() -> None:
    torch.manual_seed(0)
    x = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    perfect = clip_loss(x, x, scale)
    shuffled = clip_loss(x, x[torch.randperm(6)], scale)
    assert perfect < shuffled
    # Uniform similarities give log(N).
    assert math.isclose(float(clip_loss(x, x, torch.tensor(0.0))), math.log(6), rel_tol=1e-6)
    # Weights: a 0/1 weight vector equals the mean over the selected anchors.
    w = torch.tensor([1.0, 0, 1, 0, 1, 1])
    logits = scale * x @ x.t()
    tgt = torch.arange(6)
    per = 0.5 * (
        F.cross_entropy(logits, tgt, reduction="none")
        + F.cross_entropy(logits.t(), tgt, reduction="none")
    )
    assert torch.isclose(clip_loss(x, x, scale, w), per[w.bool()].mean())
    with pytest.raises(ValueError, match="zero"):
        clip_loss(x, x, scale, torch.zeros(6))
    with pytest.raises(ValueError, match="differ"):
        clip_loss(x, x[:5], scale)


def test_text_pooling() -> None:
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert pool_text(hidden, mask, "last").squeeze(1).tolist() == [2.0, 7.0]
    assert pool_text(hidden, mask, "cls").squeeze(1).tolist() == [0.0, 4.0]
    assert pool_text(hidden, mask, "mean").squeeze(1).tolist() == [1.0, 5.5]
    with pytest.raises(ValueError, match="pooling"):
        pool_text(hidden, mask, "max")


def test_model_roundtrip_and_logit_scale(tmp_path) -> None:
    torch.manual_seed(0)
    model = CLIPModel(TINY_MODEL).eval()
    assert math.isclose(float(model.logit_scale.detach()), math.log(100.0), rel_tol=1e-6)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "vision" / "model.safetensors").is_file()
    assert (tmp_path / "m" / "text" / "model.safetensors").is_file()
    loaded = CLIPModel.from_pretrained(tmp_path / "m").eval()
    batch = _batch(model)
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)
    with pytest.raises(FileNotFoundError, match="clip_config"):
        CLIPModel.from_pretrained(tmp_path)


def test_select_sections() -> None:
    report = (
        "PATIENT INFORMATION: Female, 70 years old.\nTECHNIQUE: PA chest radiograph.\n"
        "FINDINGS: The heart is enlarged.\n  No pneumothorax.\nIMPRESSION: Cardiomegaly.\n"
    )
    wanted = ["findings", "IMPRESSION"]
    assert (
        select_sections(report, wanted) == "The heart is enlarged. No pneumothorax. Cardiomegaly."
    )
    assert select_sections(report, None) == report
    # Prompts and free text have no headers; a report without the wanted ones stays whole.
    assert select_sections("no cardiomegaly", wanted) == "no cardiomegaly"
    assert select_sections(report, ["HISTORY"]) == report


def test_image_mean_pooling_and_frozen_text_projection(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = {
        **TINY_MODEL,
        "image": {**TINY_MODEL["image"], "pooling": "mean"},
        "text": {**TINY_MODEL["text"], "freeze_projection": True, "sections": ["FINDINGS"]},
    }
    model = CLIPModel(cfg).eval()
    w = model.text_projection.weight
    assert not w.requires_grad
    # Orthonormal rows (embed_dim < width): the projection keeps text geometry in its span.
    torch.testing.assert_close(w @ w.t(), torch.eye(w.shape[0]), atol=1e-5, rtol=0)
    pixels = model.preprocess_images(torch.rand(3, 1, 32, 32))
    hidden = model.vision(pixel_values=pixels).last_hidden_state
    expected = F.normalize(model.visual_projection(hidden[:, 1:].mean(1)), dim=-1)
    torch.testing.assert_close(model.encode_image(pixels), expected)
    tok = model.tokenize(["TECHNIQUE: AP.\nFINDINGS: No pneumothorax."])
    assert tok["input_ids"].tolist() == model.tokenize(["No pneumothorax."])["input_ids"].tolist()
    model.save_pretrained(tmp_path / "m")
    loaded = CLIPModel.from_pretrained(tmp_path / "m")
    assert not loaded.text_projection.weight.requires_grad
    torch.testing.assert_close(loaded.text_projection.weight, w)
    with pytest.raises(ValueError, match=r"image\.pooling"):
        CLIPModel({**TINY_MODEL, "image": {**TINY_MODEL["image"], "pooling": "max"}})
