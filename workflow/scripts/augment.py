"""Snakemake adapter: rules augment and synth_pretrain (synthetic-data utility)."""

from pathlib import Path

import torch

from cxrfoundry.eval.utility import run_augmentation, run_pretraining
from cxrfoundry.pipeline import Step

torch.set_num_threads(snakemake.threads)

with Step(snakemake) as step:
    run = run_augmentation if snakemake.rule == "augment" else run_pretraining
    record = run(
        Path(snakemake.input.shards),
        Path(snakemake.input.synthetic),
        snakemake.params.backbone,
        Path(snakemake.output.metrics),
        snakemake.params.settings,
        seed=snakemake.params.seed,
        model_name=snakemake.wildcards.model,
        dataset=snakemake.wildcards.corpus,
    )
    step.log_metrics({record["metric"]: record["value"]})
    step.log_artifact(snakemake.output.metrics)
