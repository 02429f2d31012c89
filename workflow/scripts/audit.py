"""Snakemake adapter: rule audit."""

from pathlib import Path

from cxrfoundry.audit import audit_to_files
from cxrfoundry.pipeline import Step

with Step(snakemake) as step:
    step.log_metrics(audit_to_files(".", Path(snakemake.output.json).parent))
