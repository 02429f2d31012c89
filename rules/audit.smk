# audit: row conservation across the data stages, per dataset and corpus.


rule data_audit:
    input:
        ingest=expand("results/manifests/{dataset}.audit.json", dataset=DATASETS),
        frontal=expand("results/frontal/{dataset}.audit.json", dataset=DATASETS),
        reports=expand("results/reports/{dataset}.audit.json", dataset=DATASETS),
        shards=expand("results/shards/{corpus}", corpus=CORPORA),
    output:
        audit="results/audit/data.json",
    params:
        datasets=DATASETS,
        corpora=CORPORA,
        code=code("cxrfoundry.data.audit"),
    log:
        "logs/data_audit/all.log",
    script:
        "../workflow/scripts/data_audit.py"
