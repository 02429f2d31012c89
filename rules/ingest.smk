# ingest: native metadata -> the manifest contract (DESIGN.md section 3) + rejects.


rule ingest:
    input:
        raw="resources/raw/{dataset}",
        raw_manifest="resources/raw/{dataset}.manifest.json",
    output:
        manifest="results/manifests/{dataset}.parquet",
        rejects="results/manifests/{dataset}.rejects.parquet",
        audit="results/manifests/{dataset}.audit.json",
    log:
        "logs/ingest/{dataset}.log",
    benchmark:
        "benchmarks/ingest/{dataset}.tsv"
    priority: 2
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 2
    params:
        adapter=dataset_adapter,
        options=dataset_ingest_options,
        code=code("cxrfoundry.data.ingest"),
    script:
        "../workflow/scripts/ingest.py"
