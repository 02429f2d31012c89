"""Snakemake adapter: rule dino_ablation (one table over the DINO variants)."""

from pathlib import Path

from cxrfoundry.pipeline import Step
from cxrfoundry.train.dino import summarize_ablation

with Step(snakemake) as step:
    summary = summarize_ablation(
        model_dirs=[Path(p) for p in snakemake.input.models],
        benchmark_root=Path(snakemake.output.table).parent,
        variants=snakemake.params.variants,
        out_md=Path(snakemake.output.table),
        out_json=Path(snakemake.output.summary),
    )
    step.log_artifact(snakemake.output.table)
