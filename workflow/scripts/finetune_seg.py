"""Snakemake adapter: rule finetune_seg (segmentation head on any backbone)."""

from pathlib import Path

import torch

from cxrfoundry.pipeline import Step
from cxrfoundry.train.finetune import finetune_segmentation

torch.set_num_threads(snakemake.threads)

with Step(snakemake) as step:
    result = finetune_segmentation(
        shards_dir=Path(snakemake.input.shards),
        backbone=snakemake.params.backbone,
        out_json=Path(snakemake.output.metrics),
        cfg=snakemake.params.settings,
        seed=snakemake.params.seed,
        model_name=snakemake.wildcards.model,
        dataset=snakemake.params.dataset,
        log_metrics=step.log_metrics,
    )
    per_class = {f"dice.{k}": v for k, v in result["per_class"].items()}
    step.log_metrics({"dice_mean": result["value"], **per_class})
    step.log_artifact(snakemake.output.metrics)
