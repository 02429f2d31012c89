# Config helpers of the CXformer stage (rules/dino.smk): models, inputs and default targets.
from cxrfoundry.config import deep_merge

DINO = config.get("dino", {})
DINO_VARIANTS = sorted(DINO.get("variants", {}))


def dino_enabled():
    return bool(DINO.get("enabled", False))


def dino_pretrain_config(wildcards):
    """train_dino config of a DINO model: dino.pretrain, patched for an ablation variant."""
    name = wildcards.dino_model
    if name == "dino":
        return DINO.get("pretrain", {})
    return deep_merge(DINO.get("pretrain", {}), DINO["variants"][name[len("dino_") :]])


def dino_shards(wildcards=None):
    """The shard folder DINO pretrains and benchmarks on (dino.corpus)."""
    corpus = DINO.get("corpus", "demo")
    if corpus not in CORPORA:
        raise ValueError(
            f"dino.corpus {corpus!r} is not a configured corpus: {CORPORA}"
        )
    return f"results/shards/{corpus}"


def dino_backbone_input(wildcards):
    """The model folder a benchmark job needs (none for the random-init baseline)."""
    if wildcards.model == "dino_random":
        return []
    return f"results/models/{wildcards.model}"


def dino_model_dir(wildcards):
    """The evaluated model's folder: its pretraining run is the MLflow parent (None: random)."""
    return dino_backbone_input(wildcards) or None


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
    """Models and benchmarks of the CXformer stage (main model and baseline; none when off)."""
    if not dino_enabled():
        return []
    models = ["dino", "dino_random"] + (["clip"] if DINO.get("benchmark_clip") else [])
    return ["results/models/dino"] + [
        f"results/benchmarks/{m}/{task}.json" for m in models for task in ("cls", "seg")
    ]
