"""DINO pretraining: smoke run, exact resume, DDP (2 gloo processes) equivalence."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from cxrfoundry.train.dino import GlobalBatchSampler, resolve_config, train_dino
from cxrfoundry.train.engine import load_checkpoint

from .dino_shards import make_shards, one_torch_thread  # noqa: F401 (autouse fixture)

CFG = {
    "backbone": {
        "arch": "vit_demo",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "patch_size": 8,
        "num_register_tokens": 2,
    },
    "dino_head": {"n_prototypes": 32, "hidden_dim": 32, "bottleneck_dim": 16},
    "ibot_head": {"n_prototypes": 24, "hidden_dim": 32, "bottleneck_dim": 16},
    "augment": {"global_size": 32, "local_size": 16, "n_local": 2},
    "masking": {"probability": 0.5},
    "batch_size": 8,
    "epochs": 2,
    "lr": 1e-3,
    "freeze_backbone_epochs": 0,
    "log_every": 1,
    "keep_training_state": False,
    "diagnostics": {"n_images": 4},
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("dino") / "shards", {"train": 16, "test": 4})


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {
        **load_file(model_dir / "backbone" / "model.safetensors"),
        **load_file(model_dir / "heads.safetensors"),
    }


def test_sampler_union_is_independent_of_world_size() -> None:
    single = list(GlobalBatchSampler(20, 8, seed=3, total_steps=4))
    ranks = [
        list(GlobalBatchSampler(20, 8, seed=3, rank=r, world=2, total_steps=4)) for r in (0, 1)
    ]
    for step in range(4):
        assert single[step] == ranks[0][step] + ranks[1][step]
    resumed = list(GlobalBatchSampler(20, 8, seed=3, start_step=3, total_steps=4))
    assert resumed == single[3:]
    assert {e for batch in single for e, _ in batch} == {0, 1}  # 2 steps per epoch


def test_smoke_pretrain_writes_loadable_backbone(tmp_path, shards) -> None:
    logged = []
    metrics = train_dino(
        shards,
        tmp_path / "dino",
        {**CFG, "centering": "sinkhorn", "loss_weights": {"koleo": 0.1}, "epochs": 1},
        seed=0,
        log_metrics=lambda m, step: logged.append((step, m)),
    )
    assert metrics["finished"] and metrics["step"] == 2
    assert metrics["total_flops"] > 0 and metrics["samples_per_s"] > 0
    assert metrics["mfu"] is None  # CPU: no peak to compare with
    assert 0 <= metrics["registers"]["high_norm_share"] <= 1
    assert [s for s, _ in logged] == [1, 2] and "loss_koleo" in logged[0][1]
    for _, m in logged:  # collapse monitors: entropies within [0, ln K], cosine within [-1, 1]
        assert 0 <= m["target_entropy"] <= math.log(32) + 1e-4
        assert 0 <= m["target_batch_entropy"] <= math.log(32) + 1e-4
        assert -1 <= m["cls_cosine"] <= 1
    model = AutoModel.from_pretrained(tmp_path / "dino" / "backbone")
    assert model.config.num_register_tokens == 2
    out = model(pixel_values=torch.randn(1, 3, 32, 32))
    assert out.last_hidden_state.shape == (1, 1 + 2 + 16, 32)
    saved = json.loads((tmp_path / "dino" / "metrics.json").read_text())
    assert saved["total_flops"] == metrics["total_flops"]
    assert json.loads((tmp_path / "dino" / "config.json").read_text())["seed"] == 0


def test_exact_resume_matches_uninterrupted_run(tmp_path, shards) -> None:
    train_dino(shards, tmp_path / "straight", CFG, seed=1)
    partial = train_dino(shards, tmp_path / "resumed", CFG, seed=1, stop_at=3)
    assert partial == {
        "finished": False,
        "step": 3,
        "checkpoint": str(tmp_path / ".resumed.work" / "checkpoint.pt"),
    }
    assert not (tmp_path / "resumed").exists()  # nothing published before the end
    train_dino(shards, tmp_path / "resumed", CFG, seed=1)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_errors_are_clear(tmp_path, shards) -> None:
    with pytest.raises(ValueError, match="unknown dino config keys"):
        resolve_config({"batchsize": 3})
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train_dino(shards, tmp_path / "x", {**CFG, "batch_size": 64}, seed=0)
    with pytest.raises(FileNotFoundError, match="index"):
        train_dino(tmp_path / "nowhere", tmp_path / "x", CFG, seed=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_rank(rank: int, port: int, shards: Path, out: Path, cfg: dict, errors: Path) -> None:
    """One rank of the DDP test, in a forked child (no second interpreter start-up)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )
    try:
        train_dino(shards, out, cfg, seed=5)
    except BaseException:
        (errors / f"rank{rank}.txt").write_text(traceback.format_exc())
        raise


def test_ddp_two_gloo_processes_match_one_process(tmp_path, shards) -> None:
    cfg = {**CFG, "epochs": 1, "batch_size": 8, "keep_training_state": True}
    port = _free_port()
    # Forked ranks share the imported torch/transformers: starting two fresh interpreters costs
    # far more than the training itself on a loaded machine.
    context = multiprocessing.get_context("fork")
    procs = [
        context.Process(
            target=_ddp_rank, args=(rank, port, shards, tmp_path / "ddp", cfg, tmp_path)
        )
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    train_dino(shards, tmp_path / "single", cfg, seed=5)
    for rank, proc in enumerate(procs):
        proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()
        error = tmp_path / f"rank{rank}.txt"
        assert proc.exitcode == 0, error.read_text() if error.exists() else proc.exitcode
    ddp, single = _weights(tmp_path / "ddp"), _weights(tmp_path / "single")
    assert ddp.keys() == single.keys()
    for key in single:
        assert torch.allclose(ddp[key], single[key], atol=1e-5, rtol=1e-4), key
    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp_metrics["world_size"] == 2
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert ddp_metrics["step"] == single_metrics["step"] == 2
    # Adam's first steps hardly depend on gradient magnitudes, so the weights alone would miss
    # a missing all-reduce; the centres are batch means and show it directly.
    states = [load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("ddp", "single")]
    for key in ("dino_center", "ibot_center"):
        assert torch.allclose(states[0][key]["center"], states[1][key]["center"], atol=1e-5)


def test_ablation_table(tmp_path) -> None:
    from cxrfoundry import io as cio
    from cxrfoundry.train.dino import summarize_ablation

    bench = tmp_path / "benchmarks"
    for i, model in enumerate(["dino", "dino_reg0", "dino_random"]):
        replicates = [0.6 + i / 100 + d for d in (-0.02, 0.0, 0.01, 0.02)]
        cls = {"value": 0.6 + i / 100, "ci_low": 0.5, "ci_high": 0.7, "per_class": {},
               "details": {"bootstrap_replicates": replicates}}  # fmt: skip
        cio.write_json(bench / model / "cls.json", cls)
        cio.write_json(bench / model / "seg.json", {"per_class": {"lungs": 0.9, "heart": 0.8}})
        if model != "dino_random":
            registers = {"high_norm_share": 0.02 * i}
            metrics = {"num_register_tokens": 4 - 4 * i, "centering": "ema", "n_prototypes": 64,
                       "total_flops": 1e12, "registers": registers}  # fmt: skip
            cio.write_json(tmp_path / "models" / model / "metrics.json", metrics)
    rows = summarize_ablation(
        [tmp_path / "models" / "dino", tmp_path / "models" / "dino_reg0"],
        bench,
        {"reg0": {"backbone": {"num_register_tokens": 0}}},
        tmp_path / "t.md",
        tmp_path / "t.json",
    )
    assert [r["model"] for r in rows] == ["dino", "dino_reg0", "dino_random"]
    assert rows[1]["variant"] == {"backbone": {"num_register_tokens": 0}}
    assert rows[0]["auroc_gain"] == pytest.approx(-0.02) and rows[2]["auroc_gain"] is None
    table = (tmp_path / "t.md").read_text()
    assert (
        "| dino_reg0 | 0 | ema | 64 | 0.6100 [0.500, 0.700] | -0.0100 [-0.010, -0.010] | 0.9000 "
        "| 0.8000 | 1e+12 | 2.00% |" in table
    )
    with pytest.raises(FileNotFoundError, match="benchmark missing"):
        summarize_ablation(
            [tmp_path / "models" / "dino"], tmp_path / "x", {}, tmp_path / "a", tmp_path / "b"
        )
