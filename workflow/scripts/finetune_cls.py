"""Snakemake adapter: rule finetune_cls (classification head on any backbone)."""

from pathlib import Path

import torch

from cxrfoundry.pipeline import Step
from cxrfoundry.train.finetune import finetune_classification

torch.set_num_threads(snakemake.threads)

with Step(snakemake) as step:
    result = finetune_classification(
        shards_dir=Path(snakemake.input.shards),
        backbone=snakemake.params.backbone,
        out_json=Path(snakemake.output.metrics),
        cfg=snakemake.params.settings,
        seed=snakemake.params.seed,
        model_name=snakemake.wildcards.model,
        dataset=snakemake.params.dataset,
        log_metrics=step.log_metrics,
    )
    step.log_metrics({"auroc_mean": result["value"], "n": result["n"]})
    step.log_artifact(snakemake.output.metrics)
