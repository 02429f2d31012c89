"""Generation quality of ChexGen: FID in two feature spaces, diversity, factual correctness,
prompted-finding detection and ControlNet mask adherence (the ``generation_quality`` rule).

Two *judge* models are trained on real images with the existing downstream code
(:mod:`cxrfoundry.eval.heads` + :func:`cxrfoundry.train.finetune.fit`):

* a CXR classifier (``train_quality_classifier`` → ``results/models/cxr_classifier``): the
  CXformer head on a ViT; its penultimate layer (the head's input) is the second FID feature
  space, and its scores measure factual correctness and prompted-finding detection;
* a segmenter (``train_quality_segmenter`` → ``results/models/cxr_segmenter``): the linear
  patch-grid head; it segments ControlNet outputs for the mask-adherence Dice.

Metrics (:func:`evaluate`), all from data:

* **FID** with torchmetrics' ``FrechetInceptionDistance`` and a custom feature extractor, in
  the pipeline's CLIP image space and in the classifier's penultimate space: real test images
  vs the matched synthetic cohort (trained model), vs the same prompts and seeds through an
  untrained (random-init) transformer, vs a Gaussian pixel-noise baseline, and vs real
  validation images (the real-to-real floor at this sample size).
* **Diversity**: mean pairwise MS-SSIM (torchmetrics) between the 4 seeds of each of ``P``
  prompts (lower = more diverse), and the same for random pairs of real images.
* **Factual correctness**: Pearson r between the classifier's scores on each real test image
  and on the synthetic images generated from its report (pooled over findings, and per
  finding), with a patient-bootstrap CI.
* **Prompted-finding detection**: the classifier's per-finding AUROC on the synthetic images
  against the labels they were prompted with (patient-bootstrap CIs).
* **ControlNet mask adherence**: Dice between the lungs/heart masks a ControlNet cohort was
  conditioned on and the segmentation of the images it produced (and, as a reference, of the
  unconditioned images of the same reports).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrfoundry import io as cio
from cxrfoundry.config import deep_merge
from cxrfoundry.data import imaging
from cxrfoundry.eval import heads
from cxrfoundry.eval import metrics as M
from cxrfoundry.schema import FINDING_COLUMNS, FINDING_NAME_BY_COLUMN, MASK_BITS
from cxrfoundry.train import engine, finetune
from cxrfoundry.train.augment import equalize_histogram

log = logging.getLogger(__name__)

#: Keys of a judge config besides the finetune ones: the backbone (a random-init DINO
#: backbone config or a model folder) and what to save.
JUDGE_KEYS = {"backbone"}
DEFAULT_BACKBONE: dict[str, Any] = {
    "arch": "vit_demo",
    "patch_size": 16,
    "num_register_tokens": 0,
}
CLASSIFIER_DEFAULTS: dict[str, Any] = {
    **finetune.CLS_DEFAULTS,
    "backbone": DEFAULT_BACKBONE,
    "n_last_blocks": 1,
    "equalize": False,
    "image_size": 64,
    "head_lr": 1e-3,
    "backbone_lr": 5e-4,
    "epochs": 20,
    "batch_size": 64,
}
SEGMENTER_DEFAULTS: dict[str, Any] = {
    **finetune.SEG_DEFAULTS,
    "backbone": {**DEFAULT_BACKBONE, "patch_size": 8},
    "equalize": False,
    "image_size": 64,
    "head_lr": 1e-3,
    "backbone_lr": 5e-4,
    "epochs": 10,
    "batch_size": 32,
}
#: Settings of :func:`evaluate` (the ``chexgen.quality`` block).
QUALITY_DEFAULTS: dict[str, Any] = {
    "real_split": "test",
    "reference_split": "val",
    "diversity_prompts": 16,
    "diversity_seeds": 4,
    # The standard 5-scale MS-SSIM (Gaussian window of sigma 1.5, i.e. 11 px) needs images
    # larger than 160 px; smaller ones take fewer scales (the first weights, renormalised:
    # :func:`ms_ssim_betas`).
    "ms_ssim": {"sigma": 1.5, "betas": [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]},
    "untrained": True,
    "noise": True,
    "batch_size": 64,
    "detection_threshold": 0.7,
    "grid_findings": 6,
    "grid_cases": 3,
    "bootstrap": 200,
    "alpha": 0.05,
    "device": "auto",
}
STRUCTURES = ("lungs", "heart")


def resolve(cfg: Mapping[str, Any] | None, defaults: Mapping[str, Any], what: str) -> dict:
    """``defaults`` updated with ``cfg`` (nested mappings merged); unknown keys raise
    ``ValueError`` naming them."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; expected some of {sorted(defaults)}")
    return deep_merge(defaults, cfg)


# --------------------------------------------------------------------------- images


def prepare(images: torch.Tensor, size: int, equalize: bool) -> torch.Tensor:
    """uint8 ``(N, S, S)`` → uint8 ``(N, size, size)`` exactly as ``finetune.load_split`` does
    for shards (optional histogram equalisation, then antialiased bilinear resizing)."""
    out = []
    for image in images:
        x = equalize_histogram(image) if equalize else image.float() / 255.0
        if tuple(x.shape) != (size, size):
            x = F.interpolate(x[None, None], size=(size, size), mode="bilinear", antialias=True)[
                0, 0
            ]
        out.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(out)


def to_stored(images: np.ndarray, size: int, policy: str = "pad") -> torch.Tensor:
    """Generated float images ``(N, h, w)`` in [0, 1] → uint8 ``(N, size, size)`` as a cohort
    stores them (8-bit, then :func:`cxrfoundry.data.imaging.resize`)."""
    out = [
        imaging.resize(np.round(np.clip(im, 0, 1) * 255).astype(np.uint8), size, policy)
        for im in images
    ]
    return torch.from_numpy(np.stack(out))


def noise_images(reference: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The noise baseline: i.i.d. Gaussian pixels with the reference images' mean and std."""
    ref = reference.float()
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn((n, *reference.shape[1:]), generator=g) * ref.std() + ref.mean()
    return x.round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- judges


def _masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    y, w = target[..., 0], target[..., 1]
    per = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")
    return (per * w).sum() / w.sum().clamp(min=1)


def _load(shards: str | os.PathLike[str], split: str, cfg: Mapping[str, Any], **kw: Any):
    from cxrfoundry.eval.probe import load_cohort

    return load_cohort(shards, split, cfg, **kw)


def _save_judge(model: nn.Module, out: Path, settings: Mapping[str, Any], extra: Mapping) -> None:
    from safetensors.torch import save_file

    model.features.backbone.save_pretrained(out / "backbone", safe_serialization=True)
    head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    save_file(head, str(out / "head.safetensors"))
    cio.write_json(out / "judge.json", {"settings": dict(settings), **dict(extra)})


def train_classifier(
    shards: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
) -> dict[str, Any]:
    """Train the judge classifier on the train split; save it and its test AUROC.

    ``cfg`` overrides :data:`CLASSIFIER_DEFAULTS` (``finetune.CLS_DEFAULTS`` keys + backbone).
    ``out_dir`` gets ``backbone/`` (HF layout), ``head.safetensors``, ``judge.json`` and
    ``metrics.json`` (per-finding AUROC on the test split with patient-bootstrap CIs).
    """
    settings = resolve(cfg, CLASSIFIER_DEFAULTS, "quality classifier")
    columns = list(settings["findings"] or FINDING_COLUMNS)
    cols = [FINDING_COLUMNS.index(c) for c in columns]
    engine.seed_everything(seed)
    device = engine.init_distributed(settings["device"]).device
    train = _load(shards, settings["train_split"], settings, max_rows=settings["max_train_rows"])
    test = _load(shards, settings["test_split"], settings)
    model = heads.ClassificationModel(
        heads.load_backbone(settings["backbone"], seed=seed),
        len(cols),
        int(settings["n_last_blocks"]),
    ).to(device)
    targets = torch.stack([train.labels[:, cols], train.valid[:, cols].float()], -1)
    info = finetune.fit(
        model,
        _masked_bce,
        train.images,
        targets,
        settings,
        seed=seed,
        device=device,
        desc="judge classifier",
    )
    scores = torch.sigmoid(finetune.predict(model, test.images, settings, device)).double().numpy()
    result = M.classification_metrics(
        scores,
        test.labels[:, cols].numpy(),
        test.patient_ids,
        valid=test.valid[:, cols].numpy(),
        class_names=[FINDING_NAME_BY_COLUMN[c] for c in columns],
        n_boot=int(settings["bootstrap"]),
        seed=seed,
    )
    metrics = {
        "macro_auroc": result.macro_auroc.as_dict(),
        "per_class": result.per_class(),
        "n_train": len(train),
        "n_test": result.n,
        "train_s": info.pop("train_s"),
        **info,
    }
    log.info("judge classifier: test macro AUROC %s", result.macro_auroc.value)
    out = Path(out_dir)
    with cio.atomic_dir(out) as tmp:
        _save_judge(model.cpu(), tmp, settings, {"task": "classification", "findings": columns})
        cio.write_json(tmp / "metrics.json", M.jsonable(metrics))
    return metrics


def train_segmenter(
    shards: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
) -> dict[str, Any]:
    """Train the judge segmenter (lungs, heart) on the train split; save it and its test Dice."""
    settings = resolve(cfg, SEGMENTER_DEFAULTS, "quality segmenter")
    structures = list(settings["structures"])
    unknown = sorted(set(structures) - set(MASK_BITS))
    if unknown:
        raise ValueError(f"unknown structures {unknown}; expected some of {sorted(MASK_BITS)}")
    engine.seed_everything(seed)
    device = engine.init_distributed(settings["device"]).device
    data = {}
    for name, split, cap in (
        ("train", settings["train_split"], settings["max_train_rows"]),
        ("test", settings["test_split"], None),
    ):
        cohort = _load(shards, split, settings, with_masks=True, max_rows=cap)
        keep = np.flatnonzero(cohort.has_mask.numpy())
        if keep.size == 0:
            raise ValueError(f"{shards}: split {split!r} has no rows with a mask")
        data[name] = cohort.subset(keep)
    model = heads.SegmentationModel(
        heads.load_backbone(settings["backbone"], seed=seed), len(structures)
    ).to(device)
    info = finetune.fit(
        model,
        lambda logits, target: heads.segmentation_loss(logits, target, settings["dice_weight"]),
        data["train"].images,
        mask_targets(data["train"].masks, structures),
        settings,
        seed=seed,
        device=device,
        desc="judge segmenter",
    )
    test = data["test"]
    pred = finetune.predict(model, test.images, settings, device) > 0
    dice = heads.dice_per_image(pred, mask_targets(test.masks, structures)).numpy()
    result = M.dice_metrics(
        dice, test.patient_ids, structures, n_boot=int(settings["bootstrap"]), seed=seed
    )
    metrics = {
        "dice_mean": result.mean.as_dict(),
        "per_class": result.per_class(),
        "n_train": len(data["train"]),
        "n_test": result.n,
        "train_s": info.pop("train_s"),
        **info,
    }
    log.info("judge segmenter: test Dice %s", result.mean.value)
    out = Path(out_dir)
    with cio.atomic_dir(out) as tmp:
        _save_judge(model.cpu(), tmp, settings, {"task": "segmentation", "structures": structures})
        cio.write_json(tmp / "metrics.json", M.jsonable(metrics))
    return metrics


def mask_targets(masks: torch.Tensor, structures: Sequence[str]) -> torch.Tensor:
    """Bit masks ``(N, S, S)`` → bool ``(N, len(structures), S, S)``."""
    bits = torch.tensor([MASK_BITS[s] for s in structures], dtype=torch.uint8).view(1, -1, 1, 1)
    return (masks.unsqueeze(1) & bits) > 0


def load_judge(model_dir: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """A judge saved by :func:`train_classifier` / :func:`train_segmenter` (eval mode)."""
    from safetensors.torch import load_file

    root = Path(model_dir)
    if not (root / "judge.json").is_file():
        raise FileNotFoundError(f"{root / 'judge.json'}: not a judge model folder")
    meta = cio.read_json(root / "judge.json")
    settings = meta["settings"]
    backbone = heads.load_backbone(root / "backbone")
    if meta["task"] == "classification":
        model: nn.Module = heads.ClassificationModel(
            backbone, len(meta["findings"]), int(settings["n_last_blocks"])
        )
    else:
        model = heads.SegmentationModel(backbone, len(meta["structures"]))
    model.head.load_state_dict(load_file(str(root / "head.safetensors")))
    return model.eval(), {**settings, **{k: v for k, v in meta.items() if k != "settings"}}


# --------------------------------------------------------------------------- features


class FeatureExtractor(nn.Module):
    """A torchmetrics FID feature extractor: float images ``(B, 1, S, S)`` in [0, 1] → ``fn``
    features ``(B, num_features)`` (``num_features`` saves torchmetrics a probe pass)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], num_features: int) -> None:
        super().__init__()
        self.fn = fn
        self.num_features = int(num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(images).float()


def classifier_features(
    model: nn.Module, settings: Mapping[str, Any], device: torch.device
) -> FeatureExtractor:
    """The classifier's penultimate layer (its head's input) as an FID feature space."""

    def fn(images: torch.Tensor) -> torch.Tensor:
        u8 = prepare(
            (images[:, 0] * 255).round().to(torch.uint8),
            settings["image_size"],
            settings["equalize"],
        )
        return model.embed(finetune.to_pixels(u8, settings, device)).cpu()

    return FeatureExtractor(fn, model.head.in_features)


def clip_features(clip: nn.Module, device: torch.device) -> FeatureExtractor:
    """The pipeline's CLIP image encoder (normalised image embeddings) as an FID space."""

    def fn(images: torch.Tensor) -> torch.Tensor:
        return clip.encode_image(clip.preprocess_images(images.to(device))).cpu()

    return FeatureExtractor(fn, clip.visual_projection.out_features)


def fid_scores(
    extractor: FeatureExtractor,
    real: torch.Tensor,
    fakes: Mapping[str, torch.Tensor],
    *,
    batch_size: int = 64,
) -> dict[str, float]:
    """FID (torchmetrics) of each uint8 image set in ``fakes`` against ``real``, in the space
    of ``extractor``; the real statistics are computed once."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=False)

    def feed(images: torch.Tensor, is_real: bool) -> None:
        for s in range(0, len(images), batch_size):
            metric.update(images[s : s + batch_size].float().unsqueeze(1) / 255.0, real=is_real)

    feed(real, True)
    out = {}
    for name, images in fakes.items():
        metric.reset()
        feed(images, False)
        out[name] = float(metric.compute())
    return out


def classifier_scores(
    model: nn.Module, settings: Mapping[str, Any], images: torch.Tensor, device: torch.device
) -> np.ndarray:
    """Sigmoid scores ``(N, n_findings)`` of uint8 images ``(N, S, S)``."""
    u8 = prepare(images, settings["image_size"], settings["equalize"])
    return torch.sigmoid(finetune.predict(model, u8, settings, device)).double().numpy()


def segment(
    model: nn.Module, settings: Mapping[str, Any], images: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Bool masks ``(N, n_structures, s, s)`` at the segmenter's image size."""
    u8 = prepare(images, settings["image_size"], settings["equalize"])
    return finetune.predict(model, u8, settings, device) > 0


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Bit masks ``(N, S, S)`` → ``(N, size, size)`` (nearest)."""
    if masks.shape[-1] == size:
        return masks
    return F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(
        torch.uint8
    )


# --------------------------------------------------------------------------- statistics


def weighted_pearson(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A :func:`cxrfoundry.eval.metrics.bootstrap_statistic` statistic: Pearson r of the
    pooled ``(row, column)`` pairs of ``x``, ``y`` (``(n, k)``) under per-row weights."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    k = x.shape[1]
    sx, sy = x.sum(1), y.sum(1)
    sxx, syy, sxy = (x * x).sum(1), (y * y).sum(1), (x * y).sum(1)

    def stat(w: np.ndarray) -> np.ndarray:
        n = w.sum(1) * k
        with np.errstate(invalid="ignore", divide="ignore"):
            mx, my = (w @ sx) / n, (w @ sy) / n
            cov = (w @ sxy) / n - mx * my
            vx, vy = (w @ sxx) / n - mx * mx, (w @ syy) / n - my * my
            return cov / np.sqrt(np.clip(vx, 0, None) * np.clip(vy, 0, None))

    return stat


def _ms_ssim_window(sigma: float) -> int:
    return int(3.5 * sigma + 0.5) * 2 + 1  # the Gaussian window torchmetrics uses


def ms_ssim_betas(betas: Sequence[float], size: int, sigma: float) -> list[float]:
    """The MS-SSIM scale weights usable at image side ``size``: the first ``n`` of ``betas``,
    renormalised to their original sum, for the largest ``n`` that torchmetrics accepts (its
    size checks, and a coarsest scale wider than the window's reflect padding).

    Raises ``ValueError`` when not even one scale fits.
    """
    window = _ms_ssim_window(sigma)
    betas = [float(b) for b in betas]
    for n in range(len(betas), 0, -1):
        fits = (
            size >= 2**n
            and size // max(1, n - 1) ** 2 > window - 1
            and size // 2 ** (n - 1) > window // 2
        )
        if fits:
            head = betas[:n]
            return [b * sum(betas) / sum(head) for b in head]
    raise ValueError(f"MS-SSIM: {size} px images are too small for a {window} px window")


def pairwise_ms_ssim(groups: torch.Tensor, cfg: Mapping[str, Any]) -> np.ndarray:
    """Mean MS-SSIM over the pairs of images within each group ``(G, k, S, S)`` (uint8), with
    as many of ``cfg["betas"]`` scales as the image size allows (:func:`ms_ssim_betas`)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    k = groups.shape[1]
    sigma = float(cfg["sigma"])
    window = _ms_ssim_window(sigma)
    betas = ms_ssim_betas(cfg["betas"], min(groups.shape[-2:]), sigma)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    x = groups.float().unsqueeze(2) / 255.0  # (G, k, 1, S, S)
    a = torch.cat([x[:, i] for i, _ in pairs])
    b = torch.cat([x[:, j] for _, j in pairs])
    values = multiscale_structural_similarity_index_measure(
        a,
        b,
        data_range=1.0,
        sigma=sigma,
        kernel_size=window,  # with a Gaussian kernel only its size check reads this
        betas=tuple(betas),
        reduction="none",
    )
    return values.view(len(pairs), -1).mean(0).double().numpy()


def _estimate(stat, ids, cfg, seed) -> dict[str, Any]:
    est, _ = M.bootstrap_statistic(
        stat, ids, n_boot=int(cfg["bootstrap"]), seed=seed, alpha=float(cfg["alpha"])
    )
    return est.as_dict()


# --------------------------------------------------------------------------- evaluation


def untrained_pipeline(pipe: Any, seed: int) -> Any:
    """The same pipeline with a randomly initialised transformer of the same configuration
    (diffusers' default init: a non-trivial, untrained noise predictor)."""
    from diffusers import PixArtTransformer2DModel

    from cxrfoundry.generate.pipeline import ChexGenPipeline

    torch.manual_seed(int(seed))
    transformer = PixArtTransformer2DModel.from_config(pipe.transformer.config).eval()
    return ChexGenPipeline(
        transformer=transformer.to(pipe.device),
        vae=pipe.vae,
        scheduler=pipe.scheduler,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        max_tokens=pipe.config.max_tokens,
        prompt_sections=getattr(pipe.config, "prompt_sections", None),
    )


def _cohort_rows(path: str | os.PathLike[str], columns: Sequence[str]) -> dict[str, list[Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxrfoundry.eval.probe import resolve_shards

    table = pa.concat_tables(
        [pq.read_table(p, columns=list(columns)) for p in resolve_shards(path, None)]
    )
    return {c: table.column(c).to_pylist() for c in columns}


def evaluate(
    *,
    real_shards: str | os.PathLike[str],
    cohort: str | os.PathLike[str],
    pipeline_dir: str | os.PathLike[str],
    classifier_dir: str | os.PathLike[str],
    clip_dir: str | os.PathLike[str] | None,
    segmenter_dir: str | os.PathLike[str] | None = None,
    controlnet_cohort: str | os.PathLike[str] | None = None,
    out_json: str | os.PathLike[str],
    grid_png: str | os.PathLike[str] | None,
    cfg: Mapping[str, Any] | None,
    sampling: Mapping[str, Any],
    seed: int,
    dataset: str,
    model_name: str = "chexgen",
) -> dict[str, Any]:
    """Compute every generation-quality metric and write the metrics JSON (and the grid).

    ``cohort``: a matched cohort of ``real_split`` (one or more images per real case,
    ``source_image_id`` set); ``controlnet_cohort``: a matched ControlNet cohort (masks kept).
    ``value`` is the FID in the classifier space; every figure is in the record's keys.
    """
    from cxrfoundry.generate import cohorts as C
    from cxrfoundry.generate.pipeline import ChexGenPipeline

    cfg = resolve(cfg, QUALITY_DEFAULTS, "chexgen.quality")
    device = engine.init_distributed(cfg["device"]).device
    raw = {"image_size": None, "equalize": False}
    real = _load(real_shards, cfg["real_split"], raw, name="real")
    size = int(real.images.shape[-1])
    syn = _load(cohort, None, {**raw, "image_size": size}, source="synthetic", name="synthetic")
    meta = _cohort_rows(cohort, ["image_id", "source_image_id", "seed", "guidance", "report"])
    if meta["image_id"] != syn.image_ids:
        raise ValueError(f"{cohort}: metadata rows are not in image order")
    real_pos = {i: k for k, i in enumerate(real.image_ids)}
    missing = [s for s in meta["source_image_id"] if s not in real_pos]
    if missing:
        raise ValueError(
            f"{cohort}: {len(missing)} images have no source in {real_shards}:{cfg['real_split']} "
            f"(e.g. {missing[0]!r}); generation_quality needs a matched cohort of that split"
        )
    classifier, csettings = load_judge(classifier_dir)
    classifier.to(device)
    columns = list(csettings["findings"])
    cols = [FINDING_COLUMNS.index(c) for c in columns]
    names = [FINDING_NAME_BY_COLUMN[c] for c in columns]

    # ---- FID: trained vs untrained vs noise vs real reference, two feature spaces
    pipe = ChexGenPipeline.from_pretrained(pipeline_dir).to(device)
    gen_size = int(pipe.transformer.config.sample_size * pipe.latent_factor)
    plan = [
        {"report": r, "seed": s, "guidance": g}
        for r, s, g in zip(meta["report"], meta["seed"], meta["guidance"], strict=True)
    ]
    steps = int(sampling["num_inference_steps"])
    batch = int(sampling.get("batch_size", 32))
    fakes: dict[str, torch.Tensor] = {"trained": syn.images}
    if cfg["untrained"]:
        images = C.generate(
            untrained_pipeline(pipe, seed), plan, num_inference_steps=steps, batch_size=batch
        )
        fakes["untrained"] = to_stored(images, size)
    if cfg["noise"]:
        fakes["noise"] = noise_images(real.images, len(syn), seed)
    if cfg.get("reference_split"):
        fakes["real_" + cfg["reference_split"]] = _load(
            real_shards, cfg["reference_split"], {**raw, "image_size": size}
        ).images
    fid: dict[str, dict[str, float]] = {}
    fid["classifier"] = fid_scores(
        classifier_features(classifier, csettings, device),
        real.images,
        fakes,
        batch_size=cfg["batch_size"],
    )
    if clip_dir:
        from cxrfoundry.models.clip import CLIPModel

        clip = CLIPModel.from_pretrained(clip_dir).to(device).eval()
        fid["clip"] = fid_scores(
            clip_features(clip, device), real.images, fakes, batch_size=cfg["batch_size"]
        )
    log.info("FID: %s", fid)

    # ---- factual correctness and prompted-finding detection
    real_scores = classifier_scores(classifier, csettings, real.images, device)
    syn_scores = classifier_scores(classifier, csettings, syn.images, device)
    source_rows = np.asarray([real_pos[s] for s in meta["source_image_id"]])
    sums = np.zeros_like(real_scores)
    counts = np.zeros(len(real_scores))
    np.add.at(sums, source_rows, syn_scores)
    np.add.at(counts, source_rows, 1)
    matched = np.flatnonzero(counts > 0)
    mean_syn = sums[matched] / counts[matched, None]
    ids = real.patient_ids[matched]
    pearson = {
        "pooled": _estimate(weighted_pearson(real_scores[matched], mean_syn), ids, cfg, seed),
        "per_finding": {
            n: _estimate(weighted_pearson(real_scores[matched, j], mean_syn[:, j]), ids, cfg, seed)
            for j, n in enumerate(names)
        },
        "n_real": int(matched.size),
    }
    detection = M.classification_metrics(
        syn_scores,
        syn.labels[:, cols].numpy(),
        syn.patient_ids,
        valid=syn.valid[:, cols].numpy(),
        class_names=names,
        n_boot=int(cfg["bootstrap"]),
        seed=seed,
        alpha=float(cfg["alpha"]),
    )
    real_detection = M.classification_metrics(
        real_scores,
        real.labels[:, cols].numpy(),
        real.patient_ids,
        valid=real.valid[:, cols].numpy(),
        class_names=names,
        n_boot=0,
        seed=seed,
    )
    threshold = float(cfg["detection_threshold"])
    detected = [n for n in names if (detection.auroc[n].value or 0) >= threshold]

    # ---- diversity: 4 seeds per prompt
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xD1F]))
    k = int(cfg["diversity_seeds"])
    n_prompts = min(int(cfg["diversity_prompts"]), len(real))
    chosen = np.sort(rng.choice(len(real), size=n_prompts, replace=False))
    reports = _cohort_rows(
        real_shards_split(real_shards, cfg["real_split"]), ["image_id", "report"]
    )
    report_of = dict(zip(reports["image_id"], reports["report"], strict=True))
    guidance = float(sampling["guidance_scale"])
    div_plan = [
        {
            "report": report_of[real.image_ids[i]],
            "seed": C.SEED_STRIDE * (j + 1) + int(i),
            "guidance": guidance,
        }
        for i in chosen
        for j in range(k)
    ]
    div_images = to_stored(
        C.generate(pipe, div_plan, num_inference_steps=steps, batch_size=batch), size
    ).view(n_prompts, k, size, size)
    ms_cfg = cfg["ms_ssim"]
    div_values = pairwise_ms_ssim(div_images, ms_cfg)
    real_groups = torch.stack(
        [real.images[rng.choice(len(real), size=k, replace=False)] for _ in range(n_prompts)]
    )
    real_div = pairwise_ms_ssim(real_groups, ms_cfg)
    prompt_ids = real.patient_ids[chosen]
    diversity = {
        "ms_ssim_synthetic": _estimate(
            M.weighted_mean_statistic(div_values), prompt_ids, cfg, seed
        ),
        "ms_ssim_real_pairs": float(real_div.mean()),
        "prompts": n_prompts,
        "seeds_per_prompt": k,
        "settings": {**ms_cfg, "betas_used": ms_ssim_betas(ms_cfg["betas"], size, ms_cfg["sigma"])},
    }

    # ---- ControlNet mask adherence
    control: dict[str, Any] | None = None
    if segmenter_dir and controlnet_cohort:
        control = _mask_adherence(
            segmenter_dir, controlnet_cohort, cohort, syn, size, device, cfg, seed
        )

    record = M.metrics_record(
        task="generation_quality",
        model=model_name,
        dataset=dataset,
        metric="fid_classifier",
        estimate=M.Estimate(fid["classifier"]["trained"], None, None, 0),
        n=len(syn),
        per_class={
            n: {
                "auroc_synthetic": detection.auroc[n].value,
                "auroc_synthetic_ci": [detection.auroc[n].ci_low, detection.auroc[n].ci_high],
                "auroc_real": real_detection.auroc[n].value,
                "pearson": pearson["per_finding"][n]["value"],
                "n_positive_synthetic": detection.n_positive[n],
            }
            for n in names
        },
        fid=fid,
        fid_n={name: len(images) for name, images in fakes.items()} | {"real": len(real)},
        factual_correctness=pearson,
        detection={
            "macro_auroc": detection.macro_auroc.as_dict(),
            "threshold": threshold,
            "findings_detected": detected,
            "n_detected": len(detected),
            "real_macro_auroc": real_detection.macro_auroc.value,
        },
        diversity=diversity,
        controlnet=control,
        details={
            "real": f"{real_shards}:{cfg['real_split']}",
            "cohort": str(cohort),
            "controlnet_cohort": str(controlnet_cohort) if controlnet_cohort else None,
            "generated_size": gen_size,
            "stored_size": size,
            "sampling": dict(sampling),
            "config": cfg,
            "seed": seed,
            "classifier": str(classifier_dir),
            "clip": str(clip_dir) if clip_dir else None,
        },
    )
    M.write_metrics(out_json, record)
    if grid_png:
        finding_grid(real, syn, meta["source_image_id"], columns, grid_png, cfg)
    return record


def real_shards_split(shards: str | os.PathLike[str], split: str) -> list[Path]:
    """The shard files of one split (for reading extra columns in load order)."""
    from cxrfoundry.data.dataset import list_shards

    return list_shards(shards, split)


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` (n > 1) that moves every index."""
    if n < 2:
        raise ValueError(f"no derangement of {n} item(s)")
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.roll(order, 1)
    return out


def _mask_adherence(
    segmenter_dir, controlnet_cohort, plain_cohort, plain, size, device, cfg, seed
) -> dict[str, Any]:
    """Dice of segmented ControlNet outputs against their condition masks (lungs, heart), and
    of the unconditioned images of the same sources against the same masks."""
    segmenter, ssettings = load_judge(segmenter_dir)
    segmenter.to(device)
    structures = list(ssettings["structures"])
    raw = {"image_size": size, "equalize": False}
    ctl = _load(controlnet_cohort, None, raw, source="synthetic", with_masks=True)
    keep = np.flatnonzero(ctl.has_mask.numpy())
    if keep.size == 0:
        raise ValueError(f"{controlnet_cohort}: no image has a condition mask")
    ctl = ctl.subset(keep)
    s = int(ssettings["image_size"])
    target = mask_targets(resize_masks(ctl.masks, s), structures)
    pred_ctl = segment(segmenter, ssettings, ctl.images, device)
    dice = heads.dice_per_image(pred_ctl, target).numpy()
    boot = {"n_boot": int(cfg["bootstrap"]), "seed": seed, "alpha": float(cfg["alpha"])}
    result = M.dice_metrics(dice, ctl.patient_ids, structures, **boot)
    out: dict[str, Any] = {
        "dice_mean": result.mean.as_dict(),
        "per_structure": result.per_class(),
        "n": result.n,
    }
    # The same outputs against another image's mask: if the model follows its own mask rather
    # than average anatomy, Dice drops; the paired drop is the mask-specific adherence.
    if len(keep) > 1:
        other = torch.from_numpy(derangement(len(keep), seed))
        swapped = heads.dice_per_image(pred_ctl, target[other]).numpy().mean(axis=1)
        for key, values in (
            ("dice_mismatched_masks", swapped),
            ("mask_specific_gain", dice.mean(axis=1) - swapped),
        ):
            estimate, _ = M.bootstrap_statistic(
                M.weighted_mean_statistic(values), ctl.patient_ids, **boot
            )
            out[key] = estimate.as_dict()
    # The same sources without control: how much of the overlap the masks themselves add.
    src_ctl = _cohort_rows(controlnet_cohort, ["image_id", "source_image_id"])
    src_of = dict(zip(src_ctl["image_id"], src_ctl["source_image_id"], strict=True))
    src_plain = _cohort_rows(plain_cohort, ["image_id", "source_image_id"])
    first_plain: dict[str, int] = {}
    for i, s_id in enumerate(src_plain["source_image_id"]):
        first_plain.setdefault(s_id, i)
    pairs = [
        (a, first_plain[src_of[iid]])
        for a, iid in enumerate(ctl.image_ids)
        if src_of[iid] in first_plain
    ]
    if pairs:
        a_idx, b_idx = map(np.asarray, zip(*pairs, strict=True))
        pred = segment(segmenter, ssettings, plain.images[torch.from_numpy(b_idx)], device)
        base = heads.dice_per_image(pred, target[torch.from_numpy(a_idx)]).numpy()
        ref = M.dice_metrics(base, ctl.patient_ids[a_idx], structures, **boot)
        out["dice_without_control"] = ref.mean.as_dict()
        out["per_structure_without_control"] = ref.per_class()
    return out


def finding_grid(
    real: Any,
    syn: Any,
    sources: Sequence[str],
    columns: Sequence[str],
    out_png: str | os.PathLike[str],
    cfg: Mapping[str, Any],
) -> None:
    """PNG grid: per finding (rows, the most frequent in the real split), real positive cases
    beside the synthetic image generated from each one's report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first_syn: dict[str, int] = {}
    for i, s in enumerate(sources):
        first_syn.setdefault(s, i)
    cols = [FINDING_COLUMNS.index(c) for c in columns if c != "no_finding"]
    positives = (real.labels[:, cols] > 0).sum(0).numpy()
    order = [cols[j] for j in np.argsort(-positives, kind="stable")[: int(cfg["grid_findings"])]]
    order = [FINDING_COLUMNS.index("no_finding"), *order] if "no_finding" in columns else order
    k = int(cfg["grid_cases"])
    fig, axes = plt.subplots(
        len(order), 2 * k, figsize=(1.3 * 2 * k, 1.45 * len(order)), squeeze=False
    )
    for r, col in enumerate(order):
        cases = [
            i
            for i in np.flatnonzero(real.labels[:, col].numpy() > 0)
            if real.image_ids[i] in first_syn
        ][:k]
        for c in range(k):
            for side, ax in enumerate(axes[r][2 * c : 2 * c + 2]):
                ax.set_xticks([])
                ax.set_yticks([])
                if c >= len(cases):
                    ax.axis("off")
                    continue
                i = cases[c]
                image = real.images[i] if side == 0 else syn.images[first_syn[real.image_ids[i]]]
                ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=255)
                ax.set_title("real" if side == 0 else "synthetic", fontsize=6)
        axes[r][0].set_ylabel(FINDING_NAME_BY_COLUMN[FINDING_COLUMNS[col]], fontsize=6)
    fig.suptitle(
        "ChexGen: real test cases (left) and images generated from their reports", fontsize=8
    )
    fig.tight_layout()
    with cio.atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
