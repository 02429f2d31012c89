"""Snakemake adapter: the report figures of rules utility_plot, sample_grid, curation_plot and
ablation_plot (ROC curves and fairness bars come from rules probe and fairness themselves)."""

from pathlib import Path

from cxrfoundry import io as cio
from cxrfoundry.eval import metrics, plots
from cxrfoundry.pipeline import Step

with Step(snakemake) as step:
    out = Path(snakemake.output[0])
    rule = snakemake.rule
    if rule == "utility_plot":
        plots.utility_plot(Path(snakemake.input.augment), Path(snakemake.input.pretrain), out)
    elif rule == "sample_grid":
        synthetic = getattr(snakemake.input, "test", None)
        plots.sample_grid(snakemake.input.shards, synthetic, out)
    elif rule == "curation_plot":
        plots.curation_plot(Path(snakemake.input.model), out)
    elif rule == "ablation_plot":
        records = [metrics.read_metrics(p) for p in snakemake.input.metrics]
        dino = [row for p in snakemake.input.dino for row in cio.read_json(p)]
        plots.ablation_figure(records, out, dino_ablation=dino or None)
    else:
        raise ValueError(f"bench_plots.py does not handle rule {rule!r}")
    step.log_artifact(out)
