# CheXficient: curated CLIP pretraining, then zero-shot findings and image<->report retrieval.
# GPUs: `gpu`/`nodes` default to a CPU run here; the Slurm profile sets them (set-resources).


rule pretrain_clip:
    input:
        shards=clip_shards,
    output:
        model=directory("results/models/clip"),
    log:
        "logs/pretrain_clip/clip.log",
    benchmark:
        "benchmarks/pretrain_clip/clip.tsv"
    # Two threads: it can only start when both cores are free. Behind the one-core model jobs
    # that happens only once they are all done (the demo's last two minutes, one core idle
    # before); ahead of them it runs as soon as the shards exist.
    priority: 2
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 2
    resources:
        gpu=0,
        nodes=1,
    params:
        settings=clip_train_settings(),
        seed=config["seed"],
        work_dir="results/.work/models/clip",
        code=code("cxrfoundry.train.clip"),
    script:
        "../workflow/scripts/pretrain_clip.py"


rule zeroshot:
    input:
        model="results/models/clip",
        shards=clip_shards,
    output:
        metrics="results/benchmarks/clip/zeroshot.json",
    log:
        "logs/zeroshot/clip.log",
    benchmark:
        "benchmarks/zeroshot/clip.tsv"
    conda:
        "../envs/cxrfoundry.yaml"
    resources:
        gpu=0,
    params:
        model_dir=evaluated_model,  # MLflow: a child run of pretrain_clip's run
        settings=config["clip"]["eval"],
        seed=config["seed"],
        code=code("cxrfoundry.eval.zeroshot"),
    script:
        "../workflow/scripts/zeroshot.py"


rule retrieval:
    input:
        model="results/models/clip",
        shards=clip_shards,
    output:
        metrics="results/benchmarks/clip/retrieval.json",
    log:
        "logs/retrieval/clip.log",
    benchmark:
        "benchmarks/retrieval/clip.tsv"
    conda:
        "../envs/cxrfoundry.yaml"
    resources:
        gpu=0,
    params:
        model_dir=evaluated_model,  # MLflow: a child run of pretrain_clip's run
        settings=config["clip"]["eval"],
        seed=config["seed"],
        code=code("cxrfoundry.eval.retrieval"),
    script:
        "../workflow/scripts/retrieval.py"
