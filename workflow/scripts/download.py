"""Snakemake adapter: rule download."""

from pathlib import Path

from cxrfoundry.data.download import download
from cxrfoundry.pipeline import Step

with Step(snakemake) as step:
    manifest = download(
        snakemake.params.source,
        Path(snakemake.output.raw),
        Path(snakemake.output.manifest),
        dataset=snakemake.wildcards.dataset,
    )
    step.log_metrics({"n_files": manifest["n_files"], "total_bytes": manifest["total_bytes"]})
