"""Snakemake adapter: rule ingest."""

from pathlib import Path

from cxrfoundry.data.ingest import ingest_to_files
from cxrfoundry.pipeline import Step

with Step(snakemake) as step:
    counts = ingest_to_files(
        snakemake.wildcards.dataset,
        snakemake.params.adapter,
        Path(snakemake.input.raw),
        snakemake.params.options,
        manifest_path=Path(snakemake.output.manifest),
        rejects_path=Path(snakemake.output.rejects),
        audit_path=Path(snakemake.output.audit),
    )
    step.log_metrics(counts)
