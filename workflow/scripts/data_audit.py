"""Snakemake adapter: rule data_audit."""

from pathlib import Path

from cxrfoundry.data.audit import audit_data
from cxrfoundry.pipeline import Step

with Step(snakemake) as step:
    audit = audit_data(
        ingest=[Path(p) for p in snakemake.input.ingest],
        frontal=[Path(p) for p in snakemake.input.frontal],
        reports=[Path(p) for p in snakemake.input.reports],
        shards=[Path(p) for p in snakemake.input.shards],
        datasets=snakemake.params.datasets,
        corpora=snakemake.params.corpora,
        out_path=Path(snakemake.output.audit),
    )
    step.log_metrics(audit["totals"])
