"""Snakemake adapter: rule encode_features."""

from pathlib import Path

import torch

from cxrfoundry.generate.features import encode_from_config
from cxrfoundry.pipeline import Step

torch.set_num_threads(snakemake.threads)

with Step(snakemake) as step:
    index = encode_from_config(
        Path(snakemake.input.shards),
        Path(snakemake.output.features),
        vae_dir=Path(snakemake.input.vae),
        cfg=snakemake.params.settings,
        text_encoder=snakemake.params.text_encoder,
        max_tokens=snakemake.params.max_tokens,
        split=snakemake.params.split,
    )
    step.log_metrics(index["counts"])
