"""DDP on 2 gloo processes (CPU) = one process on the full batch: loss, gradients, curation.

Each rank holds half of the global batch, gathers embeddings across ranks and back-propagates;
DDP (or, for GradCache, the explicit all-reduce) averages gradients. The result must equal a
single process on the whole batch. Computed in float64, compared at ``rtol=1e-7, atol=1e-10``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cxrfoundry.models.clip import CLIPModel
from cxrfoundry.models.losses import clip_loss, gather_no_grad, gather_with_grad
from cxrfoundry.train.curator import CuratorConfig, PrototypeCurator
from cxrfoundry.train.gradcache import contrastive_backward

from .clip_shards import TINY_MODEL

RTOL, ATOL = 1e-7, 1e-10
WORLD = 2
N = 8
REPORTS = [
    "Cardiomegaly is present.",
    "No cardiomegaly.",
    "There is a pneumothorax.",
    "No pneumothorax.",
    "There is a pleural effusion.",
    "No pleural effusion.",
    "Cardiomegaly is present. No pneumothorax.",
    "No cardiomegaly. There is a pneumothorax.",
]
CASES = ("plain", "gradcache", "curated")


def _model() -> CLIPModel:
    torch.manual_seed(0)
    return CLIPModel(TINY_MODEL).double().eval()


def _global_batches(model: CLIPModel) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    tok = model.tokenize(REPORTS)  # one padding for all: the test is about the gradient math
    out = []
    for shift in range(2):
        pixels = model.preprocess_images(torch.rand(N, 1, 32, 32, generator=g)).double()
        ids = torch.arange(N) + shift * N
        order = torch.roll(torch.arange(N), shift)
        out.append(
            {
                "pixel_values": pixels,
                "input_ids": tok["input_ids"][order],
                "attention_mask": tok["attention_mask"][order],
                "ids": ids,
            }
        )
    return out


def _run_case(model, case: str, batches, rank: int, world: int) -> dict:
    """Run ``case`` on this rank's slice of each global batch; returns loss, grads, keep."""
    local = N // world
    curator = PrototypeCurator(
        CuratorConfig(num_prototypes=2, warmup_batches=1, central_cap=1), 2 * N, seed=0
    )
    result = {}
    for b, batch in enumerate(batches):
        if case != "curated" and b > 0:
            break
        part = {k: v[rank * local : (rank + 1) * local] for k, v in batch.items()}
        ids = part.pop("ids")
        model.zero_grad(set_to_none=True)
        keep_out = {}

        def loss_fn(i, t, s, ids=ids, keep_out=keep_out):
            ia, ta = gather_with_grad(i), gather_with_grad(t)
            if case != "curated":
                return clip_loss(ia, ta, s)
            cur = curator.step(ia.detach(), ta.detach(), gather_no_grad(ids))
            keep_out["keep"] = cur.keep
            k = cur.keep.nonzero().squeeze(1)
            return clip_loss(ia[k], ta[k], s)

        micro = 2 if case == "gradcache" else None
        loss, _, _ = contrastive_backward(model, part, loss_fn, micro_batch_size=micro)
        module = model.module if hasattr(model, "module") else model
        result = {
            "loss": loss,
            "grads": {
                n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None
            },
            "keep": keep_out.get("keep"),
        }
    return result


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        for case in CASES:
            model = _model()
            batches = _global_batches(model)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            torch.save(
                _run_case(ddp, case, batches, rank, world), Path(out_dir) / f"{case}-{rank}.pt"
            )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", CASES)
def test_ddp_equals_single_process(ddp_results: Path, case: str) -> None:
    model = _model()
    ref = _run_case(model, case, _global_batches(model), rank=0, world=1)
    for rank in range(WORLD):
        got = torch.load(ddp_results / f"{case}-{rank}.pt", weights_only=False)
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=RTOL, atol=ATOL)
        assert set(got["grads"]) == set(ref["grads"])
        for name, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, rtol=RTOL, atol=ATOL, msg=name)
        if case == "curated":
            assert torch.equal(got["keep"], ref["keep"])
            assert 0 < int(ref["keep"].sum()) < N  # the curator really dropped something
