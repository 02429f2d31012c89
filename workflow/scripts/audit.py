"""Snakemake adapter: rule audit."""

from pathlib import Path

from cxrfoundry.audit import audit_to_files
from cxrfoundry.pipeline import Step

with Step(snakemake) as step:
    out_dir = Path(snakemake.output.json).parent
    step.log_metrics(audit_to_files(".", out_dir, stages=snakemake.params.stages))
