# acquire: one job per dataset, raw files + a manifest of sizes and sha256.
# Priority 2 on every data rule (download → shards): the data products of every dataset, and
# their rejects, are finished before the model stages (priority 0-1) take the cores.


rule download:
    output:
        raw=directory("resources/raw/{dataset}"),
        manifest="resources/raw/{dataset}.manifest.json",
    log:
        "logs/download/{dataset}.log",
    benchmark:
        "benchmarks/download/{dataset}.tsv"
    priority: 2
    conda:
        "../envs/cxrfoundry.yaml"
    resources:
        runtime=240,
    params:
        source=dataset_source,
        code=code("cxrfoundry.data.download", "cxrfoundry.data.demo_sources"),
    script:
        "../workflow/scripts/download.py"
