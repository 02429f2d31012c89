"""Snakemake adapter: the report figures (rules roc_plot, fairness_plot, utility_plot,
sample_grid)."""

from pathlib import Path

from cxrfoundry.eval import plots
from cxrfoundry.pipeline import Step

with Step(snakemake, track=False) as step:
    out = Path(snakemake.output[0])
    rule = snakemake.rule
    if rule == "roc_plot":
        title = f"{snakemake.wildcards.model} ({snakemake.wildcards.mode} probe)"
        plots.roc_curves(snakemake.input.predictions, out, title=title)
    elif rule == "fairness_plot":
        plots.fairness_bars(Path(snakemake.input.metrics), out)
    elif rule == "utility_plot":
        plots.utility_plot(Path(snakemake.input.augment), Path(snakemake.input.pretrain), out)
    elif rule == "sample_grid":
        synthetic = getattr(snakemake.input, "test", None)
        plots.sample_grid(snakemake.input.shards, synthetic, out)
    else:
        raise ValueError(f"bench_plots.py does not handle rule {rule!r}")
