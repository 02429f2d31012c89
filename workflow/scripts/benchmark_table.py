"""Snakemake adapter: rule benchmark_table (summary.csv, summary.md and a table figure)."""

from pathlib import Path

from cxrfoundry.eval import plots
from cxrfoundry.eval.table import benchmark_table
from cxrfoundry.pipeline import Step

with Step(snakemake) as step:
    rows = benchmark_table(
        Path(snakemake.output.csv).parent,
        Path(snakemake.output.csv),
        Path(snakemake.output.md),
        models_dir=snakemake.params.models_dir,
        records=list(snakemake.input.metrics),
        predictions=list(snakemake.input.predictions),
        n_boot=snakemake.params.n_boot,
        seed=snakemake.params.seed,
    )
    plots.table_figure(rows, Path(snakemake.output.figure), title="Benchmark summary")
    step.log_metrics({"results": len(rows)})
    step.log_artifact(snakemake.output.md)
