"""Snakemake adapter: rule pretrain_vae."""

from pathlib import Path

import torch

from cxrfoundry.pipeline import Step
from cxrfoundry.train.diffusion import run_job

torch.set_num_threads(snakemake.threads)

with Step(snakemake) as step:
    metrics = run_job(
        "vae",
        gpus=int(snakemake.resources.get("gpu", 0)),
        nodes=int(snakemake.resources.get("nodes", 1)),
        shards_dir=Path(snakemake.input.shards),
        out_dir=Path(snakemake.output.model),
        cfg=snakemake.params.settings,
        seed=snakemake.params.seed,
    )
    step.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    step.log_artifact(Path(snakemake.output.model) / "metrics.json")
