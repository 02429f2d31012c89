"""Snakemake adapter: rule shard."""

from pathlib import Path

from cxrfoundry.data.shards import shard_corpus
from cxrfoundry.pipeline import Step

with Step(snakemake) as step:
    index = shard_corpus(
        corpus=snakemake.wildcards.corpus,
        datasets=snakemake.params.datasets,
        report_paths=[Path(p) for p in snakemake.input.reports],
        raw_roots=[Path(p) for p in snakemake.input.raw],
        out_dir=Path(snakemake.output.shards),
        settings={**snakemake.params.settings, "workers": snakemake.threads},
        seed=snakemake.params.seed,
        work_dir=Path(snakemake.params.work_dir),
    )
    step.log_metrics(index["counts"])
