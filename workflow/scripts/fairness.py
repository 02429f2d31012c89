"""Snakemake adapter: rule fairness (subgroup audit, real vs synthetic, mitigation)."""

from pathlib import Path

import torch

from cxrfoundry.eval import plots
from cxrfoundry.eval.fairness import run_fairness
from cxrfoundry.pipeline import Step

torch.set_num_threads(snakemake.threads)

with Step(snakemake) as step:
    synthetic_test = getattr(snakemake.input, "test", None)
    synthetic_train = getattr(snakemake.input, "balance", None)
    record = run_fairness(
        Path(snakemake.input.shards),
        snakemake.params.backbone,
        Path(snakemake.output.metrics),
        snakemake.params.settings,
        seed=snakemake.params.seed,
        model_name=snakemake.wildcards.model,
        dataset=snakemake.wildcards.corpus,
        synthetic_test=Path(synthetic_test) if synthetic_test else None,
        synthetic_train=Path(synthetic_train) if synthetic_train else None,
        log_metrics=step.log_metrics,
    )
    # MLflow metric names allow no "&": intersections are logged as e.g. gap.sex_x_age.
    gaps = {a.replace("&", "_x_"): g for a, g in record["gaps"].items()}
    metrics = {f"gap.{a}": g["gap"] for a, g in gaps.items()}
    metrics.update({f"worst.{a}": g["worst"] for a, g in gaps.items()})
    if record["correlation"] and record["correlation"]["pearson_r"] is not None:
        metrics["real_vs_synthetic_pearson_r"] = record["correlation"]["pearson_r"]
    for attribute, m in (record["mitigation"] or {}).items():
        if "gap_after" in m:
            metrics[f"gap_after_balancing.{attribute}"] = m["gap_after"]
    step.log_metrics(metrics)
    plots.fairness_bars(record, Path(snakemake.output.bars))
    step.log_artifact(snakemake.output.metrics)
    step.log_artifact(snakemake.output.bars)
