"""Snakemake adapter: rule synthesize_reports."""

from pathlib import Path

from cxrfoundry.pipeline import Step
from cxrfoundry.reports.synthesize import synthesize_reports_files

with Step(snakemake) as step:
    audit = synthesize_reports_files(
        Path(snakemake.input.frontal),
        snakemake.params.settings,
        reports_path=Path(snakemake.output.reports),
        audit_path=Path(snakemake.output.audit),
        cache_dir=Path(snakemake.params.cache_dir),
        dataset_policy=snakemake.params.llm_policy,
        seed=snakemake.params.seed,
    )
    step.log_metrics(audit)
