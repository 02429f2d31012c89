"""End-to-end CLIP training on tiny shards: outputs, curation subset, exact resume, evaluation."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from cxrfoundry import io as cio
from cxrfoundry.eval.retrieval import _chance, recall_at_k, retrieval_eval
from cxrfoundry.eval.zeroshot import finding_prompts, zeroshot_eval, zeroshot_scores
from cxrfoundry.train.clip import resolve_config, train_clip

from .clip_shards import TINY_MODEL, write_tiny_shards

CFG = {
    "model": TINY_MODEL,
    "curator": {"num_prototypes": 2, "warmup_batches": 1, "central_cap": 4},
    "train": {
        "epochs": 2,
        "batch_size": 16,
        "warmup_steps": 1,
        "lr": 1e-3,
        "log_every": 1,
        "checkpoint_every": 0,
    },
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards") / "tiny")


@pytest.fixture(scope="module")
def trained(shards: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "clip"
    logged = []
    metrics = train_clip(shards, out, CFG, seed=7, log_metrics=lambda m, s: logged.append(s))
    metrics["_logged"] = logged
    return out, metrics


def test_outputs_and_metrics(trained: tuple[Path, dict]) -> None:
    out, m = trained
    for name in (
        "vision/model.safetensors",
        "text/model.safetensors",
        "head.safetensors",
        "clip_config.json",
        "config.json",
        "metrics.json",
        "subset.parquet",
        "training_state.pt",
    ):
        assert (out / name).is_file(), name
    assert m["status"] == "completed" and m["epochs_completed"] == 2
    # Epoch 1 (curation) runs 48 // 16 = 3 steps; epoch 2 runs on the kept subset only.
    assert m["steps"] == 3 + m["subset_size"] // 16
    assert m["samples_seen"] == 16 * m["steps"]
    assert m["samples_in_loss"] < m["samples_seen"]
    assert 16 <= m["subset_size"] < 48
    assert m["total_flops"] == pytest.approx(m["flops_per_step"] * m["steps"])
    assert m["flops_per_step"] > 0 and m["samples_per_s"] > 0 and m["mfu"] is None  # CPU
    assert m["_logged"] == list(range(1, m["steps"] + 1))
    assert cio.read_json(out / "metrics.json")["total_flops"] == m["total_flops"]
    subset = pq.read_table(out / "subset.parquet").to_pylist()
    assert len(subset) == 48 and sum(r["kept"] for r in subset) == m["subset_size"]
    assert all(r["category"] in ("support", "central_kept") for r in subset if r["kept"])
    assert all(r["image_id"].startswith("tiny/train") for r in subset)
    assert not (out.parent / "clip.work" / "checkpoint.pt").exists()


def test_rerun_is_bit_identical(shards: Path, trained: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = trained
    again = tmp_path / "clip"
    train_clip(shards, again, CFG, seed=7)
    for name in ("head.safetensors", "vision/model.safetensors"):
        a, b = load_file(out / name), load_file(again / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (out / "subset.parquet").read_bytes() == (again / "subset.parquet").read_bytes()


def test_resume_after_sigterm_is_exact(
    shards: Path, trained: tuple[Path, dict], tmp_path: Path
) -> None:
    out, ref = trained
    target = tmp_path / "clip"

    def preempt(metrics, step):
        if step == 2:  # during curation: the curator state must survive too
            os.kill(os.getpid(), signal.SIGTERM)

    first = train_clip(shards, target, CFG, seed=7, log_metrics=preempt)
    assert first["status"] == "preempted" and first["steps"] == 2
    assert not target.exists() and (tmp_path / "clip.work" / "checkpoint.pt").is_file()
    second = train_clip(shards, target, CFG, seed=7)
    assert second["status"] == "completed"
    assert second["epoch_loss"] == ref["epoch_loss"] and second["steps"] == ref["steps"]
    for name in ("head.safetensors", "vision/model.safetensors", "text/model.safetensors"):
        a, b = load_file(out / name), load_file(target / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (out / "subset.parquet").read_bytes() == (target / "subset.parquet").read_bytes()


def test_uncurated_and_gradcache_run(shards: Path, tmp_path: Path) -> None:
    cfg = {
        **CFG,
        "curator": {"enabled": False},
        "train": {**CFG["train"], "epochs": 1, "micro_batch_size": 5},
    }
    m = train_clip(shards, tmp_path / "u", cfg, seed=1)
    assert m["steps"] == 3 and m["subset_size"] == 48 and m["samples_in_loss"] == 48
    assert all(pq.read_table(tmp_path / "u" / "subset.parquet").column("kept").to_pylist())


def test_eval_records(shards: Path, trained: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = trained
    zs = zeroshot_eval(
        out,
        shards,
        tmp_path / "zs.json",
        findings=["Cardiomegaly", "Pleural Effusion", "Pneumothorax"],
        n_boot=20,
        seed=0,
    )
    assert set(zs) >= {
        "task",
        "model",
        "dataset",
        "metric",
        "value",
        "ci_low",
        "ci_high",
        "n",
        "per_class",
    }
    assert zs["n"] == 40 and zs["dataset"] == "tiny" and 0 <= zs["value"] <= 1
    assert zs["ci_low"] <= zs["ci_high"]
    assert cio.read_json(tmp_path / "zs.json") == zs
    rt = retrieval_eval(out, shards, tmp_path / "rt.json", n_boot=20, seed=0)
    assert rt["n"] == 40 and set(rt["per_class"]) >= {
        "image_to_text_R1",
        "text_to_image_R10",
        "chance_R10",
    }
    assert rt["per_class"]["image_to_text_R10"] >= rt["per_class"]["image_to_text_R5"]


def test_prompt_templates_fill_and_fail_clearly() -> None:
    pos, neg = finding_prompts("Pleural Effusion")
    assert "there is pleural effusion." in pos and "no evidence of pleural effusion." in neg
    one = {"positive": ["{finding}"], "negative": ["no {finding}"]}
    assert finding_prompts("Edema", one) == (["Edema"], ["no Edema"])
    with pytest.raises(ValueError, match="unknown field"):
        finding_prompts("Edema", {"positive": ["{name}"], "negative": ["no"]})
    with pytest.raises(ValueError, match="no 'negative' template"):
        finding_prompts("Edema", {"positive": ["{finding}"]})


def test_ensemble_of_one_template_is_that_prompt(trained: tuple[Path, dict]) -> None:
    """A one-template 'ensemble' scores exactly like the plain prompt pair; a real ensemble
    scores differently (it is not silently ignored)."""
    from cxrfoundry.models.clip import CLIPModel

    model = CLIPModel.from_pretrained(trained[0]).eval()
    images = torch.nn.functional.normalize(torch.randn(6, int(model.config["embed_dim"])), dim=-1)
    one = {"positive": ["{finding}"], "negative": ["no {finding}"]}
    with torch.no_grad():
        tok = model.tokenize(["Edema", "no Edema"])
        text = torch.nn.functional.normalize(model.encode_text(**tok).float(), dim=-1)
        pair = float(model.scale()) * images @ text.t()
    expected = torch.softmax(pair, dim=-1)[:, 0].numpy()
    got = zeroshot_scores(model, images, ["Edema"], one)[:, 0]
    assert got == pytest.approx(expected, abs=1e-6)
    ensemble = zeroshot_scores(model, images, ["Edema"])[:, 0]
    assert abs(ensemble - expected).max() > 1e-4


def test_recall_and_chance() -> None:
    emb = torch.eye(4)
    hits = recall_at_k(emb, emb, ["a", "b", "c", "d"], ks=(1,))
    assert hits["i2t@1"].all() and hits["t2i@1"].all()
    hits = recall_at_k(emb, emb[[1, 0, 3, 2]], ["a", "b", "c", "d"], ks=(1,))
    assert not hits["i2t@1"].any()
    # Duplicated report text counts as a hit.
    hits = recall_at_k(emb, emb[[1, 0, 3, 2]], ["a", "a", "c", "c"], ks=(1,))
    assert hits["i2t@1"].all()
    import numpy as np

    assert _chance(np.array([1, 1, 1, 1]), 4, 1) == pytest.approx(0.25)
    assert _chance(np.array([2, 2]), 4, 1) == pytest.approx(0.5)
    assert _chance(np.array([1]), 10, 10) == pytest.approx(1.0)


def test_bad_config_and_input(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_config({"train": {"epoch": 3}})
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_clip(shards, tmp_path / "x", {**CFG, "train": {"batch_size": 64}}, seed=0)
    with pytest.raises(FileNotFoundError, match="index"):
        train_clip(tmp_path, tmp_path / "x", CFG, seed=0)


def test_schema_defaults_match_code() -> None:
    """The workflow schema's clip defaults are the library's defaults (one source of truth)."""
    import yaml
    from snakemake.utils import validate

    root = Path(__file__).resolve().parents[2]
    with open(root / "config" / "mini.yaml", encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    config.pop("clip", None)
    validate(config, str(root / "config" / "schema" / "config.schema.yaml"))
    block = config["clip"]
    assert {k: block[k] for k in ("model", "curator", "train")} == resolve_config({})
    assert resolve_config(block) == resolve_config({})  # workflow keys are ignored
    for name in ("config.yaml", "mini.yaml"):
        with open(root / "config" / name, encoding="utf-8") as handle:
            resolve_config(yaml.safe_load(handle)["clip"])  # no unknown keys
