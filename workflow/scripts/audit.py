"""Snakemake adapter: rule audit."""

from cxrfoundry.audit import audit_to_files
from cxrfoundry.pipeline import Step

with Step(snakemake) as step:
    step.log_metrics(audit_to_files(".", snakemake.params.out_dir))
