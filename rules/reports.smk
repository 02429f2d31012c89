# reports: keep original reports, write the missing ones (template or LLM), check and repair them.
# One rule does writing and quality control: repairs need the draft, the metadata and the same
# cache inside one job, and the audit carries every QC statistic.


rule synthesize_reports:
    input:
        frontal="results/frontal/{dataset}.parquet",
        prompts=prompt_files(),
    output:
        reports="results/reports/{dataset}.parquet",
        audit="results/reports/{dataset}.audit.json",
    log:
        "logs/synthesize_reports/{dataset}.log",
    benchmark:
        "benchmarks/synthesize_reports/{dataset}.tsv"
    priority: 2
    conda:
        "../envs/cxrfoundry.yaml"
    resources:
        gpu=reports_gpus,
    params:
        settings=config["reports"],
        llm_policy=dataset_llm_policy,
        seed=config["seed"],
        cache_dir=config["reports"]["cache_dir"],
        code=code("cxrfoundry.reports.synthesize"),
    script:
        "../workflow/scripts/synthesize_reports.py"
