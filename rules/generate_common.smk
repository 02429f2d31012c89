# Config helpers of the ChexGen stage (rules/generate.smk): settings, cohort specs (validated when
# the workflow is parsed), input functions and the default targets.
from cxrfoundry.generate.cohorts import load_spec

CHEXGEN = config["chexgen"]
FEATURE_STAGES = ("stage1", "stage2", "controlnet")
COHORT_SCHEMA = f"{workflow.basedir}/config/schema/cohort.schema.yaml"


def chexgen_enabled():
    return bool(CHEXGEN["enabled"])


def _chexgen_corpus(corpus, what):
    if corpus not in CORPORA:
        raise ValueError(f"{what} {corpus!r} is not a configured corpus: {CORPORA}")
    return f"results/shards/{corpus}"


def chexgen_shards(wildcards=None):
    """The shard folder the VAE trains on (chexgen.corpus)."""
    return _chexgen_corpus(CHEXGEN["corpus"], "chexgen.corpus")


def feature_shards(wildcards):
    """The shard folder of one feature cache (features.{stage}.corpus, else chexgen.corpus)."""
    corpus = CHEXGEN["features"][wildcards.stage].get("corpus") or CHEXGEN["corpus"]
    return _chexgen_corpus(corpus, f"chexgen.features.{wildcards.stage}.corpus")


def feature_settings(wildcards):
    """encode_from_config settings of one feature cache, with the shared prompt sections."""
    block = CHEXGEN["features"][wildcards.stage]
    settings = {k: v for k, v in block.items() if k != "corpus"}
    return {**settings, "sections": CHEXGEN["prompt_sections"]}


def ldm_settings(stage):
    """train_ldm settings of one curriculum stage: the shared ldm keys, then the stage's."""
    shared = {k: v for k, v in CHEXGEN["ldm"].items() if k not in ("stage1", "stage2")}
    return {**shared, **CHEXGEN["ldm"][stage]}


def cohort_spec_path(name):
    return f"{workflow.basedir}/{CHEXGEN['cohort_dir']}/{name}.yaml"


def _cohort_specs():
    """Every configured cohort spec, validated at parse time (errors name the file)."""
    specs = {}
    for name in CHEXGEN["cohorts"]:
        spec = load_spec(cohort_spec_path(name), COHORT_SCHEMA)
        if spec["kind"] != "stratified":
            _chexgen_corpus(spec["corpus"], f"cohort {name}: corpus")
        specs[name] = spec
    return specs


COHORT_SPECS = _cohort_specs()
QUALITY = CHEXGEN["quality"]
for _role in ("cohort", "controlnet_cohort"):
    if QUALITY[_role] and QUALITY[_role] not in COHORT_SPECS:
        raise ValueError(
            f"chexgen.quality.{_role} {QUALITY[_role]!r} is not in chexgen.cohorts"
        )


def cohort_inputs(wildcards):
    """The spec, the pipeline and, by kind, the source shards and the ControlNet."""
    spec = COHORT_SPECS[wildcards.cohort]
    inputs = {
        "spec": cohort_spec_path(wildcards.cohort),
        "pipeline": "results/models/chexgen",
    }
    if spec["kind"] != "stratified":
        inputs["shards"] = _chexgen_corpus(spec["corpus"], "cohort corpus")
    if spec["controlnet"]:
        inputs["controlnet"] = "results/models/chexgen_controlnet"
    return inputs


def cohort_image_size(wildcards):
    """Stored size of cohort images: chexgen.cohort_image_size, else the shards' size."""
    return CHEXGEN["cohort_image_size"] or config["shards"]["image_size"]


def quality_enabled():
    return chexgen_enabled() and bool(QUALITY["enabled"]) and bool(QUALITY["cohort"])


def quality_inputs(wildcards):
    """Real shards, the matched cohort(s), the pipeline, the judges and (optionally) CLIP."""
    if not QUALITY["cohort"]:
        raise ValueError(
            "generation_quality needs chexgen.quality.cohort (a matched cohort)"
        )
    corpus = COHORT_SPECS[QUALITY["cohort"]]["corpus"]
    inputs = {
        "shards": _chexgen_corpus(corpus, "quality cohort corpus"),
        "cohort": f"results/cohorts/{QUALITY['cohort']}",
        "pipeline": "results/models/chexgen",
        "classifier": "results/models/cxr_classifier",
    }
    if QUALITY["controlnet_cohort"]:
        inputs["controlnet_cohort"] = f"results/cohorts/{QUALITY['controlnet_cohort']}"
        inputs["segmenter"] = "results/models/cxr_segmenter"
    if QUALITY["clip"] and clip_enabled():
        inputs["clip"] = "results/models/clip"
    return inputs


def quality_dataset(wildcards):
    return COHORT_SPECS[QUALITY["cohort"]]["corpus"]


def quality_settings(wildcards):
    """chexgen.quality.settings, scoring the split the matched cohort was made from."""
    split = COHORT_SPECS[QUALITY["cohort"]]["split"]
    return {**QUALITY["settings"], "real_split": split}


def chexgen_targets():
    """Models, cohorts and generation metrics of ChexGen (none when chexgen.enabled is off)."""
    if not chexgen_enabled():
        return []
    out = [
        "results/models/chexgen_vae",
        "results/models/chexgen_stage1",
        "results/models/chexgen",
        "results/models/chexgen_controlnet",
    ]
    out += [f"results/cohorts/{name}" for name in COHORT_SPECS]
    if quality_enabled():
        out += [
            "results/benchmarks/chexgen/generation_quality.json",
            "results/plots/chexgen/real_vs_synthetic.png",
        ]
    return out
