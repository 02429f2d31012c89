# audit: row conservation across the data stages, per dataset and corpus.


rule data_audit:
    input:
        ingest=expand("results/manifests/{dataset}.audit.json", dataset=DATASETS),
        frontal=expand("results/frontal/{dataset}.audit.json", dataset=DATASETS),
        reports=expand("results/reports/{dataset}.audit.json", dataset=DATASETS),
        shards=expand("results/shards/{corpus}", corpus=CORPORA),
    output:
        audit="results/audit/data.json",
    log:
        "logs/data_audit/all.log",
    conda:
        "../envs/cxrfoundry.yaml"
    params:
        datasets=DATASETS,
        corpora=CORPORA,
        code=code("cxrfoundry.data.audit"),
    script:
        "../workflow/scripts/data_audit.py"


# The reproducibility audit: every output against its provenance record, an unbroken chain of
# hashes from raw files to the last output, and what is stale against the current code.
# `cxrfoundry audit` does the same from the command line and also compares params.
rule audit:
    input:
        pipeline_targets(),
    output:
        json="results/audit/audit.json",
        md="results/audit/audit.md",
    log:
        "logs/audit/all.log",
    conda:
        "../envs/cxrfoundry.yaml"
    params:
        stages=rule_stages(),
        code=code("cxrfoundry.audit"),
    script:
        "../workflow/scripts/audit.py"
