"""Snakemake adapter: rule segment (lungs/heart Dice, linear or U-Net-style head)."""

from pathlib import Path

import torch

from cxrfoundry.eval.probe import run_segmentation
from cxrfoundry.pipeline import Step

torch.set_num_threads(snakemake.threads)

with Step(snakemake) as step:
    record = run_segmentation(
        Path(snakemake.input.shards),
        snakemake.params.backbone,
        Path(snakemake.output.metrics),
        snakemake.params.settings,
        seed=snakemake.params.seed,
        model_name=snakemake.wildcards.model,
        dataset=snakemake.wildcards.corpus,
        task=f"seg_{snakemake.wildcards.head}",
        model_dir=snakemake.params.model_dir,
        log_metrics=step.log_metrics,
    )
    step.log_metrics(
        {
            "dice_mean": record["value"],
            **{f"dice.{k}": v["dice"] for k, v in record["per_class"].items()},
        }
    )
    step.log_artifact(snakemake.output.metrics)
