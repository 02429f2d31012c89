"""Snakemake adapter: rule synthesize_cohort."""

from pathlib import Path

import torch

from cxrfoundry.generate.cohorts import synthesize_cohort
from cxrfoundry.pipeline import Step

torch.set_num_threads(snakemake.threads)

with Step(snakemake) as step:
    index = synthesize_cohort(
        snakemake.input.spec,
        Path(snakemake.output.cohort),
        schema=snakemake.params.schema,
        pipeline_dir=snakemake.input.pipeline,
        shards_root=Path(snakemake.input.get("shards", "results/shards")).parent,
        controlnet_dir=snakemake.input.get("controlnet"),
        sampling=snakemake.params.sampling,
        shard_settings=snakemake.params.shard_settings,
        image_size=snakemake.params.image_size,
        seed=snakemake.params.seed,
    )
    step.log_metrics({"images": index["counts"]["rows_written"], **index["plan"]["positives"]})
    step.log_artifact(Path(snakemake.output.cohort) / "index.json")
