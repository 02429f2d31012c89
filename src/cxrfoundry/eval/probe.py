"""Classification and segmentation benchmarks on any backbone, scored with patient-level CIs.

The building blocks are shared by every benchmark of this package (probe, segmentation,
fairness, synthetic-data utility):

* :class:`Cohort` — one split (or synthetic cohort) decoded into memory: uint8 images, the 14
  labels with their validity mask, and per-image ``patient_id``, ``sex``, ``age``, ``race``,
  ``source`` (``real``/``synthetic``). :func:`load_cohort` reads shards (a shard folder with
  ``index.json``, a folder of ``*.parquet`` cohort shards, or a list of files).
* :class:`Classifier` — the CXformer head (:class:`cxrfoundry.eval.heads.ClassificationModel`:
  concat(CLS of the last 4 blocks, mean patch token) → linear) on a backbone loaded with
  :func:`cxrfoundry.eval.heads.load_backbone` (``AutoModel.from_pretrained`` of an HF folder,
  or a random-init DINO config for the baseline). ``mode="linear"`` freezes the backbone
  (linear probe: embeddings computed once); ``mode="finetune"`` trains it too, with its own lr.
  Training reuses :func:`cxrfoundry.train.finetune.fit` (masked BCE, AdamW, cosine schedule).
* :func:`run_probe` — train on the train split, score the test split, write the metrics JSON
  (per-finding AUROC/AUPRC, macro means, patient-bootstrap CIs) and a predictions table.
* :func:`run_segmentation` — lungs/heart Dice with CIs for the linear 1×1 head or a small
  U-Net-style decoder on the patch grid.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from cxrfoundry import io as cio
from cxrfoundry.data.dataset import list_shards
from cxrfoundry.eval import heads
from cxrfoundry.eval import metrics as M
from cxrfoundry.schema import FINDING_COLUMNS, FINDING_NAME_BY_COLUMN, MASK_BITS
from cxrfoundry.train import engine, finetune

log = logging.getLogger(__name__)

#: Config keys of the probe / classifier (``benchmarks.probe.settings`` in the workflow).
PROBE_DEFAULTS: dict[str, Any] = {
    "mode": "linear",  # linear (frozen backbone) | finetune (backbone trained too)
    "train_split": "train",
    "test_split": "test",
    "image_size": None,  # default: the shard image size
    "equalize": True,
    "mean": list(finetune.COMMON_DEFAULTS["mean"]),
    "std": list(finetune.COMMON_DEFAULTS["std"]),
    "epochs": 100,
    "batch_size": 64,
    "head_lr": 1e-3,
    "backbone_lr": 1e-5,  # used only with mode=finetune
    "weight_decay": 1e-4,
    "warmup_fraction": 0.05,
    "precision": "bf16",
    "device": "auto",
    "max_train_rows": None,
    "n_last_blocks": 4,
    "findings": None,  # default: every CheXpert column
    "uncertain": "negative",
    "unmentioned": "negative",
    "bootstrap": M.DEFAULT_N_BOOT,
    "alpha": 0.05,
}
#: Config keys of :func:`run_segmentation`.
SEG_DEFAULTS: dict[str, Any] = {
    **{
        k: v for k, v in PROBE_DEFAULTS.items() if k not in ("findings", "uncertain", "unmentioned")
    },
    "head": "linear",  # linear (1x1 conv) | unet (U-Net-style decoder on the patch grid)
    "structures": ["lungs", "heart"],
    "dice_weight": 1.0,
    "epochs": 30,
    "batch_size": 32,
    "decoder_channels": [64, 32],
}


def resolve_config(
    cfg: Mapping[str, Any] | None, defaults: Mapping[str, Any] = PROBE_DEFAULTS, what: str = "probe"
) -> dict[str, Any]:
    """``defaults`` updated with ``cfg``; unknown keys raise ``ValueError`` naming them."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown {what} config keys {unknown}; expected some of {sorted(defaults)}"
        )
    out = {**copy.deepcopy(dict(defaults)), **cfg}
    if out.get("mode", "linear") not in ("linear", "finetune"):
        raise ValueError(f"{what}: mode must be 'linear' or 'finetune', got {out['mode']!r}")
    return out


def finding_columns(cfg: Mapping[str, Any]) -> list[str]:
    """The finding columns a config scores (all 14 by default), validated."""
    cols = list(cfg.get("findings") or FINDING_COLUMNS)
    unknown = sorted(set(cols) - set(FINDING_COLUMNS))
    if unknown:
        raise ValueError(f"unknown finding columns {unknown}; expected some of {FINDING_COLUMNS}")
    return cols


# --------------------------------------------------------------------------- cohorts


def resolve_shards(spec: str | Path | Sequence[str | Path], split: str | None) -> list[Path]:
    """Shard files of ``spec``: a shard folder (``index.json``, filtered by ``split``), a folder
    of ``*.parquet`` files (a synthetic cohort: ``{split}-*.parquet`` when ``split`` is given
    and such files exist, else all), one file, or a list of files."""
    if isinstance(spec, str | Path):
        path = Path(spec)
        if path.is_dir():
            if (path / "index.json").is_file():
                return list_shards(path, split)
            files = sorted(path.glob(f"{split}-*.parquet")) if split else []
            files = files or sorted(path.glob("*.parquet"))
            if not files:
                raise FileNotFoundError(f"{path}: no index.json and no *.parquet shards")
            return files
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard file or folder not found")
        return [path]
    paths = [Path(p) for p in spec]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shard files not found: {missing}")
    return paths


@dataclass
class Cohort:
    """Images (uint8 ``(N, S, S)``), labels and per-image metadata held in memory."""

    images: torch.Tensor
    labels: torch.Tensor  # float32 (N, 14), schema.FINDING_COLUMNS order
    valid: torch.Tensor  # bool (N, 14)
    image_ids: list[str]
    patient_ids: np.ndarray  # object (N,)
    sex: np.ndarray  # object (N,), "" unknown
    age: np.ndarray  # float64 (N,), nan unknown
    race: np.ndarray  # object (N,), "" unknown
    source: np.ndarray  # object (N,), "real" | "synthetic"
    name: str = "cohort"
    masks: torch.Tensor | None = None  # uint8 bit masks (N, S, S)
    has_mask: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Frozen-backbone embeddings ``(N, D)`` by backbone fingerprint (:attr:`Classifier.key`):
    #: computed once per cohort, they make many head fits on subsets of it cheap.
    features: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: np.ndarray | Sequence[int], name: str | None = None) -> Cohort:
        """Rows ``index`` (int positions) as a new cohort."""
        idx = np.asarray(index, dtype=np.int64)
        t = torch.from_numpy(idx)
        return replace(
            self,
            images=self.images[t],
            labels=self.labels[t],
            valid=self.valid[t],
            image_ids=[self.image_ids[i] for i in idx],
            patient_ids=self.patient_ids[idx],
            sex=self.sex[idx],
            age=self.age[idx],
            race=self.race[idx],
            source=self.source[idx],
            name=name or self.name,
            masks=None if self.masks is None else self.masks[t],
            has_mask=None if self.has_mask is None else self.has_mask[t],
            features={k: v[t] for k, v in self.features.items()},
        )

    def meta_table(self) -> pa.Table:
        """Per-image metadata as an Arrow table."""
        return pa.table(
            {
                "image_id": self.image_ids,
                "patient_id": [str(p) for p in self.patient_ids],
                "sex": [s or None for s in self.sex],
                "age": [None if np.isnan(a) else float(a) for a in self.age],
                "race": [r or None for r in self.race],
                "source": list(self.source),
            }
        )


def concat_cohorts(cohorts: Sequence[Cohort], name: str = "combined") -> Cohort:
    """Rows of several cohorts (same image size) stacked in order."""
    if not cohorts:
        raise ValueError("no cohorts to concatenate")
    sizes = {tuple(c.images.shape[1:]) for c in cohorts}
    if len(sizes) > 1:
        raise ValueError(f"cohorts have different image sizes {sorted(sizes)}; set image_size")
    masks = None
    if all(c.masks is not None for c in cohorts):
        masks = torch.cat([c.masks for c in cohorts])  # type: ignore[misc]
    return Cohort(
        images=torch.cat([c.images for c in cohorts]),
        labels=torch.cat([c.labels for c in cohorts]),
        valid=torch.cat([c.valid for c in cohorts]),
        image_ids=[i for c in cohorts for i in c.image_ids],
        patient_ids=np.concatenate([c.patient_ids for c in cohorts]),
        sex=np.concatenate([c.sex for c in cohorts]),
        age=np.concatenate([c.age for c in cohorts]),
        race=np.concatenate([c.race for c in cohorts]),
        source=np.concatenate([c.source for c in cohorts]),
        name=name,
        masks=masks,
        has_mask=None if masks is None else torch.cat([c.has_mask for c in cohorts]),  # type: ignore[misc]
        features={
            key: torch.cat([c.features[key] for c in cohorts])
            for key in set.intersection(*(set(c.features) for c in cohorts))
        },
    )


def load_cohort(
    shards: str | Path | Sequence[str | Path],
    split: str | None,
    cfg: Mapping[str, Any],
    *,
    source: str = "real",
    with_masks: bool = False,
    max_rows: int | None = None,
    name: str | None = None,
) -> Cohort:
    """Decode shards into a :class:`Cohort` (images via :func:`finetune.load_split`).

    ``cfg`` supplies ``image_size``, ``equalize``, ``uncertain``, ``unmentioned``. Raises
    ``ValueError`` naming the shard when a row has no ``patient_id``.
    """
    paths = resolve_shards(shards, split)
    data = finetune.load_split(
        paths,  # a list of files: ShardDataset reads exactly these
        None,  # type: ignore[arg-type]
        image_size=cfg.get("image_size"),
        equalize=bool(cfg.get("equalize", True)),
        with_masks=with_masks,
        uncertain=cfg.get("uncertain", "negative"),
        unmentioned=cfg.get("unmentioned", "negative"),
        max_rows=max_rows,
    )
    n = len(data["image_ids"])
    meta = pa.concat_tables(
        [pq.read_table(p, columns=["image_id", "patient_id", "sex", "age", "race"]) for p in paths]
    ).slice(0, n)
    meta_ids = meta.column("image_id").to_pylist()
    if meta_ids != data["image_ids"]:
        raise ValueError(f"{paths[0]}: metadata rows are not in image order")
    patients = meta.column("patient_id").to_pylist()
    if any(p is None or p == "" for p in patients):
        bad = next(i for i, p in enumerate(patients) if p is None or p == "")
        raise ValueError(f"{paths}: image {meta_ids[bad]!r} has no patient_id")
    age = np.array([np.nan if a is None else float(a) for a in meta.column("age").to_pylist()])
    return Cohort(
        images=data["images"],
        labels=data["labels"],
        valid=data["valid"],
        image_ids=data["image_ids"],
        patient_ids=np.asarray(patients, dtype=object),
        sex=np.asarray([s or "" for s in meta.column("sex").to_pylist()], dtype=object),
        age=age,
        race=np.asarray([r or "" for r in meta.column("race").to_pylist()], dtype=object),
        source=np.full(n, source, dtype=object),
        name=name or f"{Path(paths[0]).parent.name}:{split or 'all'}",
        masks=data.get("masks"),
        has_mask=data.get("has_mask"),
    )


def sample_patients(cohort: Cohort, fraction: float, seed: int) -> Cohort:
    """A seeded subset with ``fraction`` of the patients (all their images; at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    codes, n_patients = M.patient_codes(cohort.patient_ids)
    k = max(1, round(fraction * n_patients))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xF4AC]))
    chosen = np.zeros(n_patients, dtype=bool)
    chosen[rng.choice(n_patients, size=k, replace=False)] = True
    return cohort.subset(np.flatnonzero(chosen[codes]), name=f"{cohort.name}@{fraction:g}")


# --------------------------------------------------------------------------- classifier


def _masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    y, w = target[..., 0], target[..., 1]
    per = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")
    return (per * w).sum() / w.sum().clamp(min=1)


def backbone_name(source: str | Path | Mapping[str, Any]) -> str:
    """A readable name of a backbone source (``random-init`` for a config mapping)."""
    return "random-init" if isinstance(source, Mapping) else str(source)


class Classifier:
    """The CXformer classification head on a backbone, trained with :func:`finetune.fit`.

    With ``mode="linear"`` the backbone is frozen, so a cohort's embeddings depend only on the
    backbone's weights: :meth:`with_features` computes them once and stores them on the cohort
    under :attr:`key` (a fingerprint of those weights and the preprocessing), and every later
    :meth:`fit` / :meth:`predict` on that cohort, its subsets and concatenations reuses them.
    Many fits of one backbone (seeds, arms, balanced training sets) then cost one embedding pass.
    """

    def __init__(
        self,
        backbone: str | Path | Mapping[str, Any],
        cfg: Mapping[str, Any] | None = None,
        *,
        seed: int = 0,
        backbone_seed: int | None = None,
    ) -> None:
        self.cfg = resolve_config(cfg)
        self.columns = finding_columns(self.cfg)
        self.cols = [FINDING_COLUMNS.index(c) for c in self.columns]
        self.seed = int(seed)
        self.source = backbone
        self.device = engine.init_distributed(self.cfg["device"]).device
        # A random-init backbone is drawn from backbone_seed (default: seed); the head from seed.
        init_seed = self.seed if backbone_seed is None else int(backbone_seed)
        engine.seed_everything(init_seed)
        backbone_module = heads.load_backbone(backbone, seed=init_seed)
        engine.seed_everything(self.seed)
        self.model = heads.ClassificationModel(
            backbone_module, len(self.cols), int(self.cfg["n_last_blocks"])
        ).to(self.device)
        self.key = self._fingerprint()
        self.samples_seen = 0
        self.fit_info: list[dict[str, Any]] = []

    def _fingerprint(self) -> str:
        """sha256 of the backbone weights and the preprocessing that shape the embeddings."""
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.features.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        prep = (self.cfg["mean"], self.cfg["std"], self.cfg["n_last_blocks"])
        digest.update(repr(prep).encode())
        return digest.hexdigest()[:16]

    @property
    def frozen(self) -> bool:
        """True for a linear probe (the backbone never changes)."""
        return self.cfg["mode"] == "linear"

    def with_features(self, cohort: Cohort) -> Cohort:
        """``cohort`` with this backbone's frozen embeddings attached (computed if missing)."""
        if not self.frozen:
            raise ValueError("cached features need a frozen backbone (mode=linear)")
        if self.key not in cohort.features:
            cohort.features[self.key] = finetune.embed_all(
                self.model, cohort.images, self.cfg, self.device
            )
        return cohort

    def _cached(self, cohort: Cohort) -> torch.Tensor | None:
        return cohort.features.get(self.key) if self.frozen else None

    def _fit_cfg(self, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        cfg = {**self.cfg, **dict(overrides or {})}
        if cfg["mode"] == "linear":
            cfg["backbone_lr"] = 0.0
        return cfg

    def fit(
        self,
        cohort: Cohort,
        *,
        overrides: Mapping[str, Any] | None = None,
        seed: int | None = None,
        log_metrics: Callable[[Mapping[str, float], int], None] | None = None,
    ) -> dict[str, Any]:
        """Train on ``cohort`` (masked BCE over the configured findings); returns fit info.

        Calling ``fit`` again continues from the current weights (pretrain, then fine-tune).
        """
        if len(cohort) == 0:
            raise ValueError(f"{cohort.name}: nothing to train on")
        cfg = self._fit_cfg(overrides)
        # fit() freezes the backbone by disabling grads when backbone_lr == 0; undo that first.
        for p in self.model.features.parameters():
            p.requires_grad_(True)
        targets = torch.stack([cohort.labels[:, self.cols], cohort.valid[:, self.cols].float()], -1)
        info = finetune.fit(
            self.model,
            _masked_bce,
            cohort.images,
            targets,
            cfg,
            seed=self.seed if seed is None else int(seed),
            device=self.device,
            log_metrics=log_metrics,
            desc=f"fit {cohort.name}",
            embeddings=self._cached(cohort) if cfg["backbone_lr"] <= 0 else None,
        )
        batch = min(int(cfg["batch_size"]), len(cohort))
        self.samples_seen += int(info["steps"]) * batch
        # Wall time varies between reruns; keep it in the log, out of the (bit-identical) JSON.
        log.info("fit %s: %d steps in %.1f s", cohort.name, info["steps"], info.pop("train_s"))
        info = {**info, "n_train": len(cohort), "cohort": cohort.name}
        self.fit_info.append(info)
        return info

    @torch.no_grad()
    def predict(self, cohort: Cohort) -> np.ndarray:
        """Sigmoid scores ``(N, n_findings)`` (float64)."""
        cached = self._cached(cohort)
        if cached is not None:
            self.model.eval()
            logits = self.model.decode(cached.to(self.device)).float().cpu()
        else:
            logits = finetune.predict(self.model, cohort.images, self.cfg, self.device)
        return torch.sigmoid(logits).double().numpy()

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the model weights (to restart several fine-tunings from one point)."""
        return copy.deepcopy(self.model.state_dict())

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore weights saved by :meth:`state`."""
        self.model.load_state_dict(state)

    def flops_per_image(self, image_size: int) -> int:
        """Forward FLOPs of one image through backbone and head (torch's FLOP counter)."""
        x = torch.zeros(1, 3, image_size, image_size, device=self.device)
        self.model.eval()
        with torch.no_grad():
            return engine.count_flops(lambda: self.model(x))


def score_cohort(
    scores: np.ndarray,
    cohort: Cohort,
    columns: Sequence[str],
    cfg: Mapping[str, Any],
    *,
    seed: int,
    n_boot: int | None = None,
) -> M.ClassificationResult:
    """:func:`metrics.classification_metrics` of ``scores`` on ``cohort``'s labels."""
    cols = [FINDING_COLUMNS.index(c) for c in columns]
    return M.classification_metrics(
        scores,
        cohort.labels[:, cols].numpy(),
        cohort.patient_ids,
        valid=cohort.valid[:, cols].numpy(),
        class_names=[FINDING_NAME_BY_COLUMN[c] for c in columns],
        n_boot=int(cfg["bootstrap"] if n_boot is None else n_boot),
        seed=seed,
        alpha=float(cfg["alpha"]),
    )


def predictions_table(scores: np.ndarray, cohort: Cohort, columns: Sequence[str]) -> pa.Table:
    """Per-image predictions: metadata, then ``label.{col}``, ``valid.{col}``, ``score.{col}``."""
    table = cohort.meta_table()
    cols = [FINDING_COLUMNS.index(c) for c in columns]
    for j, (c, k) in enumerate(zip(columns, cols, strict=True)):
        table = table.append_column(
            f"label.{c}", pa.array(cohort.labels[:, k].numpy().astype(np.int8))
        )
        table = table.append_column(f"valid.{c}", pa.array(cohort.valid[:, k].numpy()))
        table = table.append_column(f"score.{c}", pa.array(scores[:, j].astype(np.float64)))
    return table


def read_predictions(path: str | Path) -> tuple[pa.Table, list[str]]:
    """A predictions table and its finding columns; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions table not found")
    table = pq.read_table(path)
    columns = [n[len("score.") :] for n in table.column_names if n.startswith("score.")]
    if not columns:
        raise ValueError(f"{path}: no score.* columns (not a predictions table)")
    return table, columns


def model_compute(model_dir: str | Path | None) -> dict[str, Any]:
    """Pretraining ``total_flops`` and ``samples_seen`` from ``{model_dir}/metrics.json``."""
    if model_dir is None:
        return {"pretrain_flops": 0.0, "pretrain_samples_seen": 0}
    path = Path(model_dir) / "metrics.json"
    if not path.is_file():
        return {"pretrain_flops": None, "pretrain_samples_seen": None}
    data = cio.read_json(path)
    return {
        "pretrain_flops": data.get("total_flops"),
        "pretrain_samples_seen": data.get("samples_seen"),
    }


@dataclass
class ProbeRun:
    """What :func:`classification_benchmark` trained and measured (for any record format)."""

    cfg: dict[str, Any]
    columns: list[str]
    classifier: Classifier
    n_train: int
    test: Cohort
    scores: np.ndarray
    result: M.ClassificationResult
    fit: dict[str, Any]


def classification_benchmark(
    shards: str | Path,
    backbone: str | Path | Mapping[str, Any],
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
    log_metrics: Callable[[Mapping[str, float], int], None] | None = None,
) -> ProbeRun:
    """Train the classifier on ``train_split`` of ``shards``, score ``test_split``.

    The one implementation of the classification benchmark: the benchmarks stage's ``probe``
    rule (:func:`run_probe`) and the DINO stage's ``finetune_cls`` rule
    (:func:`cxrfoundry.train.finetune.finetune_classification`) both call it and only format
    the record differently. CIs resample patients (``bootstrap`` replicates, seeded).
    """
    cfg = resolve_config(cfg)
    columns = finding_columns(cfg)
    train = load_cohort(shards, cfg["train_split"], cfg, max_rows=cfg["max_train_rows"])
    test = load_cohort(shards, cfg["test_split"], cfg)
    clf = Classifier(backbone, cfg, seed=seed)
    if clf.frozen:
        clf.with_features(train)
        clf.with_features(test)
    info = clf.fit(train, log_metrics=log_metrics)
    scores = clf.predict(test)
    result = score_cohort(scores, test, columns, cfg, seed=seed)
    return ProbeRun(cfg, columns, clf, len(train), test, scores, result, info)


def run_probe(
    shards: str | Path,
    backbone: str | Path | Mapping[str, Any],
    out_json: str | Path,
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
    model_name: str,
    dataset: str | None = None,
    task: str | None = None,
    out_predictions: str | Path | None = None,
    model_dir: str | Path | None = None,
    log_metrics: Callable[[Mapping[str, float], int], None] | None = None,
) -> dict[str, Any]:
    """Linear probe (or full fine-tune, ``mode``) on ``shards``; writes the metrics JSON.

    Trains on ``train_split``, scores ``test_split``: ``value`` = macro AUROC over the findings
    with both classes in the test set, CIs by patient bootstrap; ``per_class`` holds AUROC and
    AUPRC with CIs; ``macro_auprc``, ``compute`` (FLOPs) and ``samples_seen`` are extra keys.
    ``model_dir`` (the backbone's model folder) supplies pretraining FLOPs/samples. Returns the
    record written.
    """
    run = classification_benchmark(shards, backbone, cfg, seed=seed, log_metrics=log_metrics)
    cfg, result, clf, test = run.cfg, run.result, run.classifier, run.test
    size = int(test.images.shape[-1])
    per_image = clf.flops_per_image(size)
    pre = model_compute(model_dir)
    record = M.metrics_record(
        task=task or f"probe_{cfg['mode']}",
        model=model_name,
        dataset=dataset or Path(shards).name,
        metric="auroc_macro",
        estimate=result.macro_auroc,
        n=result.n,
        per_class=result.per_class(),
        macro_auprc=result.macro_auprc.as_dict(),
        n_patients=result.n_patients,
        n_boot=result.n_boot,
        ci_method="percentile bootstrap over patients",
        samples_seen=pre["pretrain_samples_seen"],
        compute={
            "pretrain_flops": pre["pretrain_flops"],
            "eval_flops_per_image": per_image,
            # Frozen backbone: one forward per train image (embeddings are cached); fine-tuning:
            # forward + backward (~3x forward) per sample seen.
            "probe_train_flops": per_image
            * (run.n_train if cfg["mode"] == "linear" else 3 * clf.samples_seen),
        },
        details={
            "backbone": backbone_name(backbone),
            "mode": cfg["mode"],
            "n_train": run.n_train,
            "classes_scored": sum(result.auroc[c].value is not None for c in result.class_names),
            "train_samples_seen": clf.samples_seen,
            "fit": run.fit,
            "config": cfg,
            "seed": seed,
        },
    )
    M.write_metrics(out_json, record)
    if out_predictions is not None:
        cio.write_parquet(out_predictions, predictions_table(run.scores, test, run.columns))
    log.info(
        "probe %s on %s: macro AUROC %.4f [%s, %s] (n=%d, %d patients)",
        model_name,
        record["dataset"],
        record["value"] if record["value"] is not None else float("nan"),
        record["ci_low"],
        record["ci_high"],
        result.n,
        result.n_patients,
    )
    return record


# --------------------------------------------------------------------------- segmentation


class UNetSegmentationModel(nn.Module):
    """U-Net-style decoder on the patch grid: (2x upsample → concat image skip → two 3x3 conv
    blocks) per entry of ``channels``, then upsample to the input size and a 1x1 output.

    A plain ViT has no multi-scale encoder maps, so the skips are the (equalised) input image
    resized to each decoder scale, which carries the edges the 14-16 px patch grid loses.
    :meth:`embed` packs the patch grid and the image into one flat tensor so that
    :func:`finetune.fit` can cache it when the backbone is frozen.
    """

    def __init__(self, backbone: nn.Module, n_structures: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.features = heads.BackboneFeatures(backbone, n_last_blocks=1)
        self.hidden = self.features.hidden_size
        blocks, width = [], self.hidden
        for ch in channels:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(width + 1, ch, 3, padding=1),
                    nn.BatchNorm2d(ch),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(ch, ch, 3, padding=1),
                    nn.BatchNorm2d(ch),
                    nn.ReLU(inplace=True),
                )
            )
            width = ch
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(width + 1, n_structures, 1)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, D*h*w + H*W)``: the flattened patch grid, then the first image channel."""
        _, patches, _ = self.features(pixels)
        grid = patches.transpose(1, 2).flatten(1)
        return torch.cat([grid, pixels[:, 0].flatten(1).to(grid.dtype)], dim=1)

    def decode(self, embedding: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits ``(B, n_structures, *size)`` from :meth:`embed` output."""
        height, width = int(size[0]), int(size[1])
        h, w = height // self.features.patch_size, width // self.features.patch_size
        b = embedding.shape[0]
        cut = self.hidden * h * w
        x = embedding[:, :cut].reshape(b, self.hidden, h, w).float()
        image = embedding[:, cut:].reshape(b, 1, height, width).float()
        for block in self.blocks:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            skip = F.interpolate(image, size=x.shape[-2:], mode="area")
            x = block(torch.cat([x, skip], dim=1))
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        return self.out(torch.cat([x, image], dim=1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_structures, H, W)``."""
        return self.decode(self.embed(pixels), tuple(pixels.shape[-2:]))


@dataclass
class SegmentationRun:
    """What :func:`segmentation_benchmark` trained and measured."""

    cfg: dict[str, Any]
    structures: list[str]
    dice: np.ndarray  # (n_test, n_structures) hard Dice per image
    test: Cohort
    result: M.DiceResult
    n_train: int
    rows_without_mask: dict[str, int]
    fit: dict[str, Any]


def segmentation_benchmark(
    shards: str | Path,
    backbone: str | Path | Mapping[str, Any],
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
    log_metrics: Callable[[Mapping[str, float], int], None] | None = None,
) -> SegmentationRun:
    """Train a segmentation head (``head``: ``linear`` or ``unet``) on ``shards``' masks.

    The one implementation of the segmentation benchmark (rules ``segment`` and the DINO
    stage's ``finetune_seg``). Frozen backbone for ``mode=linear``, trained with its own lr for
    ``mode=finetune``. Loss: per-structure BCE + soft Dice (:func:`heads.segmentation_loss`).
    Hard Dice per test image and structure, CIs by patient bootstrap. Rows without a mask are
    left out (counted in ``rows_without_mask``).
    """
    cfg = resolve_config(cfg, SEG_DEFAULTS, "segment")
    if cfg["head"] not in ("linear", "unet"):
        raise ValueError(f"segment: head must be 'linear' or 'unet', got {cfg['head']!r}")
    structures = list(cfg["structures"])
    unknown = sorted(set(structures) - set(MASK_BITS))
    if unknown:
        raise ValueError(f"unknown structures {unknown}; expected some of {sorted(MASK_BITS)}")
    bits = torch.tensor([MASK_BITS[s] for s in structures], dtype=torch.uint8).view(1, -1, 1, 1)
    engine.seed_everything(seed)
    device = engine.init_distributed(cfg["device"]).device
    splits: dict[str, tuple[Cohort, torch.Tensor, int]] = {}
    for part, split, cap in (
        ("train", cfg["train_split"], cfg["max_train_rows"]),
        ("test", cfg["test_split"], None),
    ):
        cohort = load_cohort(shards, split, cfg, with_masks=True, max_rows=cap)
        assert cohort.has_mask is not None and cohort.masks is not None
        keep = np.flatnonzero(cohort.has_mask.numpy())
        if keep.size == 0:
            raise ValueError(f"{shards}: split {split!r} has no rows with a mask")
        kept = cohort.subset(keep)
        assert kept.masks is not None
        splits[part] = (kept, (kept.masks.unsqueeze(1) & bits) > 0, len(cohort) - keep.size)
    source = heads.load_backbone(backbone, seed=seed)
    if cfg["head"] == "unet":
        model: nn.Module = UNetSegmentationModel(source, len(structures), cfg["decoder_channels"])
    else:
        model = heads.SegmentationModel(source, len(structures))
    model = model.to(device)
    fit_cfg = {**cfg, "backbone_lr": 0.0 if cfg["mode"] == "linear" else cfg["backbone_lr"]}
    train, train_targets, _ = splits["train"]
    info = finetune.fit(
        model,
        lambda logits, target: heads.segmentation_loss(logits, target, cfg["dice_weight"]),
        train.images,
        train_targets,
        fit_cfg,
        seed=seed,
        device=device,
        log_metrics=log_metrics,
        desc=f"segment {cfg['head']}",
    )
    log.info("segment fit: %d steps in %.1f s", info["steps"], info.pop("train_s"))
    test, test_targets, _ = splits["test"]
    logits = finetune.predict(model, test.images, cfg, device)
    dice = heads.dice_per_image(logits > 0, test_targets).numpy()
    result = M.dice_metrics(
        dice,
        test.patient_ids,
        structures,
        n_boot=int(cfg["bootstrap"]),
        seed=seed,
        alpha=float(cfg["alpha"]),
    )
    return SegmentationRun(
        cfg,
        structures,
        dice,
        test,
        result,
        len(train),
        {k: v[2] for k, v in splits.items()},
        info,
    )


def run_segmentation(
    shards: str | Path,
    backbone: str | Path | Mapping[str, Any],
    out_json: str | Path,
    cfg: Mapping[str, Any] | None,
    *,
    seed: int,
    model_name: str,
    dataset: str | None = None,
    task: str | None = None,
    model_dir: str | Path | None = None,
    log_metrics: Callable[[Mapping[str, float], int], None] | None = None,
) -> dict[str, Any]:
    """:func:`segmentation_benchmark`, written as a metrics JSON; returns the record.

    ``value`` = mean Dice over structures with its patient-bootstrap CI; ``per_class`` = Dice
    per structure with CIs.
    """
    run = segmentation_benchmark(shards, backbone, cfg, seed=seed, log_metrics=log_metrics)
    cfg, result = run.cfg, run.result
    pre = model_compute(model_dir)
    record = M.metrics_record(
        task=task or f"seg_{cfg['head']}",
        model=model_name,
        dataset=dataset or Path(shards).name,
        metric="dice_mean",
        estimate=result.mean,
        n=result.n,
        per_class=result.per_class(),
        n_patients=result.n_patients,
        n_boot=int(cfg["bootstrap"]),
        ci_method="percentile bootstrap over patients",
        samples_seen=pre["pretrain_samples_seen"],
        compute={"pretrain_flops": pre["pretrain_flops"]},
        details={
            "backbone": backbone_name(backbone),
            "head": cfg["head"],
            "mode": cfg["mode"],
            "n_train": run.n_train,
            "rows_without_mask": run.rows_without_mask,
            "fit": run.fit,
            "config": cfg,
            "seed": seed,
        },
    )
    M.write_metrics(out_json, record)
    log.info(
        "segment %s (%s): mean Dice %s %s",
        model_name,
        cfg["head"],
        record["value"],
        record["per_class"],
    )
    return record
