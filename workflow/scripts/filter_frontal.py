"""Snakemake adapter: rule filter_frontal."""

from pathlib import Path

from cxrfoundry.data.views import filter_frontal_files
from cxrfoundry.pipeline import Step

with Step(snakemake) as step:
    audit = filter_frontal_files(
        Path(snakemake.input.manifest),
        Path(snakemake.input.raw),
        snakemake.params.policy,
        frontal_path=Path(snakemake.output.frontal),
        excluded_path=Path(snakemake.output.excluded),
        kept_apart_path=Path(snakemake.output.kept_apart),
        audit_path=Path(snakemake.output.audit),
        seed=snakemake.config["seed"],
    )
    step.log_metrics(audit)
