# CXformer: DINOv2-style pretraining, then classification and segmentation heads on any backbone.
# Models: `dino` (config dino.pretrain), `dino_<variant>` (dino.pretrain patched by
# dino.variants[<variant>], the ablation), `dino_random` (same architecture, random init, no
# pretraining: the baseline) and `clip` (CheXficient's image tower) with dino.benchmark_clip.
# GPUs: `gpu`/`nodes` default to a CPU run here; the Slurm profile sets them (set-resources).
# Threads: one torch thread per job (tiny CPU models run fastest so on a shared box, and two
# jobs fit on two cores); the profile may raise it (set-threads).
include: "dino_common.smk"


wildcard_constraints:
    dino_model="dino(_(" + "|".join(DINO_VARIANTS or ["NO_VARIANT"]) + "))?",


rule pretrain_dino:
    input:
        shards=dino_shards,
    output:
        model=directory("results/models/{dino_model}"),
    log:
        "logs/pretrain_dino/{dino_model}.log",
    benchmark:
        "benchmarks/pretrain_dino/{dino_model}.tsv"
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
        nodes=1,
    params:
        settings=dino_pretrain_config,
        seed=config["seed"],
        work_dir="results/.work/models/{dino_model}",
        code=code("cxrfoundry.train.dino"),
    script:
        "../workflow/scripts/pretrain_dino.py"


rule finetune_cls:
    input:
        backbone=dino_backbone_input,
        shards=dino_shards,
    output:
        metrics="results/benchmarks/{model}/cls.json",
    log:
        "logs/finetune_cls/{model}.log",
    benchmark:
        "benchmarks/finetune_cls/{model}.tsv"
    wildcard_constraints:
        model="dino(_[a-z0-9]+)?|clip",
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        backbone=dino_backbone_source,
        model_dir=dino_model_dir,
        settings=DINO.get("finetune", {}).get("cls", {}),
        dataset=DINO.get("corpus", "demo"),
        seed=config["seed"],
        code=code("cxrfoundry.train.finetune"),
    script:
        "../workflow/scripts/finetune_cls.py"


rule finetune_seg:
    input:
        backbone=dino_backbone_input,
        shards=dino_shards,
    output:
        metrics="results/benchmarks/{model}/seg.json",
    log:
        "logs/finetune_seg/{model}.log",
    benchmark:
        "benchmarks/finetune_seg/{model}.tsv"
    wildcard_constraints:
        model="dino(_[a-z0-9]+)?|clip",
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        backbone=dino_backbone_source,
        model_dir=dino_model_dir,
        settings=DINO.get("finetune", {}).get("seg", {}),
        dataset=DINO.get("corpus", "demo"),
        seed=config["seed"],
        code=code("cxrfoundry.train.finetune"),
    script:
        "../workflow/scripts/finetune_seg.py"


rule dino_ablation:
    input:
        models=expand("results/models/{m}", m=dino_models()),
        cls=expand("results/benchmarks/{m}/cls.json", m=dino_models() + ["dino_random"]),
        seg=expand("results/benchmarks/{m}/seg.json", m=dino_models() + ["dino_random"]),
    output:
        table="results/benchmarks/dino_ablation.md",
        summary="results/benchmarks/dino_ablation.json",
    log:
        "logs/dino_ablation/all.log",
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    params:
        variants=DINO.get("variants", {}),
        code=code("cxrfoundry.train.dino"),
    script:
        "../workflow/scripts/dino_ablation.py"
