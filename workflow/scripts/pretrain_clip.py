"""Snakemake adapter: rule pretrain_clip."""

from pathlib import Path

from cxrfoundry.pipeline import Step
from cxrfoundry.train.clip import pretrain_clip

with Step(snakemake) as step:
    settings = dict(snakemake.params.settings)  # model, curator, train
    metrics = pretrain_clip(
        shards_dir=Path(snakemake.input.shards),
        out_dir=Path(snakemake.output.model),
        cfg=settings,
        seed=snakemake.params.seed,
        work_dir=Path(snakemake.params.work_dir),
        gpus=int(snakemake.resources.get("gpu", 0)),
        nodes=int(snakemake.resources.get("nodes", 1)),
        log_metrics=step.log_metrics,
    )
    step.log_metrics({k: v for k, v in metrics.items() if k != "epoch_loss"})
    for name in ("metrics.json", "config.json", "subset.parquet"):
        step.log_artifact(Path(snakemake.output.model) / name)
