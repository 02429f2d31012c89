"""Snakemake adapter: rule pretrain_ldm."""

from pathlib import Path

import torch

from cxrfoundry.pipeline import Step
from cxrfoundry.train.diffusion import run_job

torch.set_num_threads(snakemake.threads)

with Step(snakemake) as step:
    metrics = run_job(
        "ldm",
        gpus=int(snakemake.resources.get("gpu", 0)),
        nodes=int(snakemake.resources.get("nodes", 1)),
        features_dirs=str(snakemake.input.features),
        out_dir=Path(snakemake.output.model),
        cfg=snakemake.params.settings,
        vae_dir=str(snakemake.input.vae),
        seed=snakemake.params.seed,
        init_from=snakemake.input.get("init"),
    )
    step.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    step.log_artifact(Path(snakemake.output.model) / "metrics.json")
