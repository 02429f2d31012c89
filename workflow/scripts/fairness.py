"""Snakemake adapter: rule fairness (subgroup audit, real vs synthetic, mitigation)."""

from pathlib import Path

from cxrfoundry.eval.fairness import run_fairness
from cxrfoundry.pipeline import Step

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
    metrics = {f"gap.{a}": g["gap"] for a, g in record["gaps"].items()}
    metrics.update({f"worst.{a}": g["worst"] for a, g in record["gaps"].items()})
    if record["correlation"] and record["correlation"]["pearson_r"] is not None:
        metrics["real_vs_synthetic_pearson_r"] = record["correlation"]["pearson_r"]
    for attribute, m in (record["mitigation"] or {}).items():
        if "gap_after" in m:
            metrics[f"gap_after_balancing.{attribute}"] = m["gap_after"]
    step.log_metrics(metrics)
    step.log_artifact(snakemake.output.metrics)
