# reports: keep original reports, write the missing ones (template or LLM) and check them all.


rule synthesize_reports:
    input:
        frontal="results/frontal/{dataset}.parquet",
    output:
        reports="results/reports/{dataset}.parquet",
        audit="results/reports/{dataset}.audit.json",
    params:
        settings=config["reports"],
        llm_policy=dataset_llm_policy,
        seed=config["seed"],
        cache_dir=config["reports"]["cache_dir"],
        code=code("cxrfoundry.reports.synthesize"),
    log:
        "logs/synthesize_reports/{dataset}.log",
    benchmark:
        "benchmarks/synthesize_reports/{dataset}.tsv"
    script:
        "../workflow/scripts/synthesize_reports.py"
