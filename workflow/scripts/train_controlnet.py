"""Snakemake adapter: rule train_controlnet."""

from pathlib import Path

import torch

from cxrfoundry.pipeline import Step
from cxrfoundry.train.diffusion import run_job

torch.set_num_threads(snakemake.threads)

with Step(snakemake) as step:
    metrics = run_job(
        "controlnet",
        gpus=int(snakemake.resources.get("gpu", 0)),
        nodes=int(snakemake.resources.get("nodes", 1)),
        features_dirs=str(snakemake.input.features),
        base_dir=str(snakemake.input.base),
        out_dir=Path(snakemake.output.model),
        cfg=snakemake.params.settings,
        seed=snakemake.params.seed,
    )
    step.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    step.log_artifact(Path(snakemake.output.model) / "metrics.json")
