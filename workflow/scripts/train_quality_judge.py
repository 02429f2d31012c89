"""Snakemake adapter: rules train_quality_classifier and train_quality_segmenter."""

from pathlib import Path

import torch

from cxrfoundry.generate import quality
from cxrfoundry.pipeline import Step

torch.set_num_threads(snakemake.threads)
TRAIN = {"classifier": quality.train_classifier, "segmenter": quality.train_segmenter}

with Step(snakemake) as step:
    metrics = TRAIN[snakemake.params.task](
        snakemake.input.shards,
        Path(snakemake.output.model),
        snakemake.params.settings,
        seed=snakemake.params.seed,
    )
    step.log_metrics({k: v for k, v in metrics.items() if k != "per_class"})
    step.log_artifact(Path(snakemake.output.model) / "metrics.json")
