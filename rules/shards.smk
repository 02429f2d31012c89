# shards: decoded, resized, re-encoded images + reports as Parquet, per corpus and split.


rule shard:
    input:
        reports=corpus_reports,
        raw=corpus_raw_dirs,
    output:
        shards=directory("results/shards/{corpus}"),
    log:
        "logs/shard/{corpus}.log",
    benchmark:
        "benchmarks/shard/{corpus}.tsv"
    priority: 2
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 8
    params:
        datasets=corpus_datasets,
        settings=config["shards"],
        seed=config["seed"],
        work_dir="results/.work/shards/{corpus}",
        code=code("cxrfoundry.data.shards"),
    script:
        "../workflow/scripts/shard.py"
