"""Snakemake adapter: rule retrieval."""

from pathlib import Path

from cxrfoundry.eval.retrieval import retrieval_eval
from cxrfoundry.pipeline import Step

with Step(snakemake) as step:
    s = snakemake.params.settings
    record = retrieval_eval(
        Path(snakemake.input.model),
        Path(snakemake.input.shards),
        Path(snakemake.output.metrics),
        split=s["split"],
        n_boot=s["n_boot"],
        seed=snakemake.params.seed,
        model_name="clip",
    )
    step.log_metrics({"recall_at_10_mean": record["value"], **record["per_class"]})
    step.log_artifact(snakemake.output.metrics)
