"""Snakemake adapter: rule probe (linear probe / fine-tuning on any backbone)."""

from pathlib import Path

import torch

from cxrfoundry.eval import plots
from cxrfoundry.eval.probe import run_probe
from cxrfoundry.pipeline import Step

torch.set_num_threads(snakemake.threads)

with Step(snakemake) as step:
    record = run_probe(
        Path(snakemake.input.shards),
        snakemake.params.backbone,
        Path(snakemake.output.metrics),
        snakemake.params.settings,
        seed=snakemake.params.seed,
        model_name=snakemake.wildcards.model,
        dataset=snakemake.wildcards.corpus,
        task=f"probe_{snakemake.wildcards.mode}",
        out_predictions=Path(snakemake.output.predictions),
        model_dir=snakemake.params.model_dir,
        log_metrics=step.log_metrics,
    )
    step.log_metrics(
        {
            "auroc_macro": record["value"],
            "auroc_macro_ci_low": record["ci_low"],
            "auroc_macro_ci_high": record["ci_high"],
            "auprc_macro": record["macro_auprc"]["value"],
            **{f"auroc.{k}": v["auroc"] for k, v in record["per_class"].items() if v["auroc"]},
        }
    )
    title = f"{snakemake.wildcards.model} ({snakemake.wildcards.mode} probe)"
    plots.roc_curves(snakemake.output.predictions, Path(snakemake.output.roc), title=title)
    step.log_artifact(snakemake.output.metrics)
    step.log_artifact(snakemake.output.roc)
