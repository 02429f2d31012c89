# acquire: one job per dataset, raw files + a manifest of sizes and sha256.


rule download:
    output:
        raw=directory("resources/raw/{dataset}"),
        manifest="resources/raw/{dataset}.manifest.json",
    params:
        source=dataset_source,
        code=code("cxrfoundry.data.download", "cxrfoundry.data.demo_sources"),
    log:
        "logs/download/{dataset}.log",
    benchmark:
        "benchmarks/download/{dataset}.tsv"
    resources:
        runtime=240,
    script:
        "../workflow/scripts/download.py"
