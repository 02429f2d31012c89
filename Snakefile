# CXR Foundry: public chest X-ray datasets -> shards -> models -> cohorts -> benchmarks.
# Thin on purpose: rules live in rules/*.smk, logic in src/cxrfoundry.
from snakemake.utils import min_version

min_version("9.0")


# The demo config is the default; a --configfile replaces it (configs are complete on their own,
# with defaults from the schema) instead of being merged into it, so no demo dataset leaks in.
if not workflow.config_settings.configfiles:

    configfile: f"{workflow.basedir}/config/config.yaml"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/ingest.smk"
include: "rules/views.smk"
include: "rules/reports.smk"
include: "rules/shards.smk"
include: "rules/dino.smk"
include: "rules/clip.smk"
include: "rules/generate.smk"  # ChexGen: models, synthetic cohorts, generation metrics
include: "rules/benchmarks.smk"  # after the model stages: its table collects their metrics
include: "rules/audit.smk"  # last: its input, pipeline_targets(), calls every stage's targets


onstart:
    init_tracking()


rule all:
    default_target: True
    input:
        all_targets(),


rule data:
    input:
        data_targets(),


# One named target per dataset, e.g. `snakemake data_nih_demo`: download -> reports for it.
for _dataset in DATASETS:

    rule:
        name:
            f"data_{_dataset}"
        input:
            dataset_targets(_dataset),
