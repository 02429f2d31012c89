"""Snakemake adapter: rule generation_quality."""

import torch

from cxrfoundry.generate.quality import evaluate
from cxrfoundry.pipeline import Step

torch.set_num_threads(snakemake.threads)

with Step(snakemake) as step:
    record = evaluate(
        real_shards=snakemake.input.shards,
        cohort=snakemake.input.cohort,
        pipeline_dir=snakemake.input.pipeline,
        classifier_dir=snakemake.input.classifier,
        clip_dir=snakemake.input.get("clip"),
        segmenter_dir=snakemake.input.get("segmenter"),
        controlnet_cohort=snakemake.input.get("controlnet_cohort"),
        out_json=snakemake.output.metrics,
        grid_png=snakemake.output.grid,
        cfg=snakemake.params.settings,
        sampling=snakemake.params.sampling,
        seed=snakemake.params.seed,
        dataset=snakemake.params.dataset,
    )
    step.log_metrics(
        {
            "fid": record["fid"],
            "factual_correctness": record["factual_correctness"]["pooled"],
            "detection": {k: v for k, v in record["detection"].items() if k != "findings_detected"},
            "diversity": record["diversity"]["ms_ssim_synthetic"],
            "controlnet": (record["controlnet"] or {}).get("dice_mean", {}),
        }
    )
    step.log_artifact(snakemake.output.metrics)
    step.log_artifact(snakemake.output.grid)
