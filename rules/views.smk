# views: keep frontal images; metadata, then DICOM tags, then an image classifier decide.


rule filter_frontal:
    input:
        raw="resources/raw/{dataset}",
        manifest="results/manifests/{dataset}.parquet",
    output:
        frontal="results/frontal/{dataset}.parquet",
        excluded="results/frontal/{dataset}.excluded.parquet",
        kept_apart="results/frontal/{dataset}.kept_apart.parquet",
        audit="results/frontal/{dataset}.audit.json",
    log:
        "logs/filter_frontal/{dataset}.log",
    benchmark:
        "benchmarks/filter_frontal/{dataset}.tsv"
    priority: 2
    conda:
        "../envs/cxrfoundry.yaml"
    params:
        policy=config["views"],
        code=code("cxrfoundry.data.views"),
    script:
        "../workflow/scripts/filter_frontal.py"
