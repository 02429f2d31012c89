# acquire: one job per dataset, raw files + a manifest of sizes and sha256.


rule download:
    output:
        raw=directory("resources/raw/{dataset}"),
        manifest="resources/raw/{dataset}.manifest.json",
    log:
        "logs/download/{dataset}.log",
    benchmark:
        "benchmarks/download/{dataset}.tsv"
    conda:
        "../envs/cxrfoundry.yaml"
    resources:
        runtime=240,
    params:
        source=dataset_source,
        code=code("cxrfoundry.data.download", "cxrfoundry.data.demo_sources"),
    script:
        "../workflow/scripts/download.py"
