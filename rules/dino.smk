# CXformer: DINOv2-style pretraining, then classification and segmentation heads on any backbone.
# Models: `dino` (config dino.pretrain), `dino_<variant>` (dino.pretrain patched by
# dino.variants[<variant>], the ablation), `dino_random` (same architecture, random init, no
# pretraining: the baseline) and `clip` (CheXficient's image tower) when a clip block exists.
# GPUs: `gpu`/`nodes` default to a CPU run here; the Slurm profile sets them (set-resources).
import copy

DINO = config.get("dino", {})
DINO_VARIANTS = sorted(DINO.get("variants", {}))


def _dino_merge(base, patch):
    """base with patch applied (nested dicts merged, other values replaced)."""
    out = copy.deepcopy(dict(base))
    for key, value in (patch or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _dino_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dino_pretrain_config(wildcards):
    """train_dino config of a DINO model: dino.pretrain, patched for an ablation variant."""
    name = wildcards.dino_model
    if name == "dino":
        return DINO.get("pretrain", {})
    return _dino_merge(DINO.get("pretrain", {}), DINO["variants"][name[len("dino_") :]])


def dino_shards(wildcards=None):
    return f"results/shards/{DINO.get('corpus', 'demo')}"


def dino_backbone_input(wildcards):
    """The model folder a benchmark job needs (none for the random-init baseline)."""
    if wildcards.model == "dino_random":
        return []
    return f"results/models/{wildcards.model}"


def dino_backbone_source(wildcards):
    """What finetune loads: an HF folder, or the random-init config of the baseline."""
    if wildcards.model == "dino_random":
        return DINO.get("pretrain", {}).get("backbone", {})
    if wildcards.model == "clip":
        return "results/models/clip/vision"
    return f"results/models/{wildcards.model}/backbone"


def dino_models():
    """Every pretrained DINO model: the main one and the ablation variants."""
    return ["dino"] + [f"dino_{v}" for v in DINO_VARIANTS]


def dino_targets():
    """Models and benchmarks of the CXformer stage (main model and baseline)."""
    if not DINO:
        return []
    models = ["dino", "dino_random"] + (["clip"] if DINO.get("benchmark_clip") else [])
    return ["results/models/dino"] + [
        f"results/benchmarks/{m}/{task}.json" for m in models for task in ("cls", "seg")
    ]


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
    threads: 2
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
    threads: 2
    resources:
        gpu=0,
    params:
        backbone=dino_backbone_source,
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
    threads: 2
    resources:
        gpu=0,
    params:
        backbone=dino_backbone_source,
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
    params:
        variants=DINO.get("variants", {}),
        code=code("cxrfoundry.train.dino"),
    script:
        "../workflow/scripts/dino_ablation.py"
