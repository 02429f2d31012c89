"""Snakemake adapter: rule zeroshot."""

from pathlib import Path

from cxrfoundry.eval.zeroshot import zeroshot_eval
from cxrfoundry.pipeline import Step

with Step(snakemake) as step:
    s = snakemake.params.settings
    record = zeroshot_eval(
        Path(snakemake.input.model),
        Path(snakemake.input.shards),
        Path(snakemake.output.metrics),
        split=s["split"],
        findings=s.get("findings"),
        min_per_class=s["min_per_class"],
        n_boot=s["n_boot"],
        seed=snakemake.params.seed,
        model_name="clip",
        prompts=s.get("prompts"),
    )
    step.log_metrics(
        {
            "mean_auroc": record["value"],
            **{f"auroc.{k}": v for k, v in record["per_class"].items() if v is not None},
        }
    )
    step.log_artifact(snakemake.output.metrics)
