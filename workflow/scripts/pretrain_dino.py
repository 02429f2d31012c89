"""Snakemake adapter: rule pretrain_dino."""

from pathlib import Path

import torch

from cxrfoundry.pipeline import Step
from cxrfoundry.train.dino import pretrain_dino

torch.set_num_threads(snakemake.threads)

with Step(snakemake) as step:
    metrics = pretrain_dino(
        shards_dir=Path(snakemake.input.shards),
        out_dir=Path(snakemake.output.model),
        cfg=snakemake.params.settings,
        seed=snakemake.params.seed,
        work_dir=Path(snakemake.params.work_dir),
        gpus=int(snakemake.resources.get("gpu", 0)),
        nodes=int(snakemake.resources.get("nodes", 1)),
        log_metrics=step.log_metrics,
    )
    step.log_metrics(
        {k: v for k, v in metrics.items() if isinstance(v, int | float) and v is not None}
    )
    step.log_metrics({f"registers.{k}": v for k, v in metrics.get("registers", {}).items()})
    for name in ("metrics.json", "config.json"):
        step.log_artifact(Path(snakemake.output.model) / name)
