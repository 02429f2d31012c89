# Shared workflow glue: config validation, the dataset registry, input functions, code hashes.
import os
from pathlib import Path

from snakemake.utils import validate

from cxrfoundry.provenance import code_hash

validate(config, schema="../config/schema/config.schema.yaml")

DATASETS = sorted(config["datasets"])
CORPORA = sorted(config["corpora"])
for _corpus, _spec in config["corpora"].items():
    _unknown = sorted(set(_spec["datasets"]) - set(DATASETS))
    if _unknown:
        raise ValueError(f"corpus {_corpus!r} names unknown datasets: {_unknown}")


wildcard_constraints:
    dataset="|".join(DATASETS) or "NO_DATASET",
    corpus="|".join(CORPORA) or "NO_CORPUS",


def code(*modules):
    """params entry that reruns a rule when the library modules it uses change."""
    return {"modules": list(modules), "sha256": code_hash(*modules)}


def dataset_config(wildcards):
    """The registry entry of the job's dataset."""
    return config["datasets"][wildcards.dataset]


def dataset_source(wildcards):
    """Download source of the job's dataset (phantom sources inherit the shared phantom settings)."""
    source = dict(dataset_config(wildcards)["source"])
    if source["type"] == "phantom":
        source["phantom"] = {**config["phantom"], **source.get("phantom", {})}
        source.setdefault("seed", config["seed"])
    return source


def dataset_ingest_options(wildcards):
    """Ingest options of the job's dataset, with the workflow's split fractions and seed."""
    entry = dataset_config(wildcards)
    return {"split_fractions": config["splits"], **entry.get("ingest", {})}


def dataset_adapter(wildcards):
    """Name of the ingest adapter for the job's dataset."""
    return dataset_config(wildcards)["adapter"]


def dataset_llm_policy(wildcards):
    """Whether the dataset's metadata may be sent to a remote LLM endpoint."""
    return dataset_config(wildcards)["llm_policy"]


def prompt_files():
    """The LLM prompt files: editing one reruns report synthesis (and misses the cache)."""
    folder = Path(workflow.basedir) / config["reports"]["prompts_dir"]
    return sorted(str(p) for p in folder.glob("*.txt"))


def reports_gpus(wildcards):
    """One GPU when the reports job starts its own inference server, else none."""
    settings = config["reports"]
    managed = (settings.get("openai") or {}).get("managed")
    return 1 if settings["backend"] == "openai" and managed else 0


def raw_dir(dataset):
    return f"resources/raw/{dataset}"


def corpus_reports(wildcards):
    """Report tables of every dataset in the corpus."""
    names = config["corpora"][wildcards.corpus]["datasets"]
    return [f"results/reports/{name}.parquet" for name in names]


def corpus_datasets(wildcards):
    """Names of the datasets in the corpus, in config order (aligned with its inputs)."""
    return list(config["corpora"][wildcards.corpus]["datasets"])


def corpus_raw_dirs(wildcards):
    """Raw folders of every dataset in the corpus (images are read from there)."""
    return [raw_dir(name) for name in config["corpora"][wildcards.corpus]["datasets"]]


def data_targets():
    """Everything up to and including the shards, plus the data audit."""
    return [f"results/shards/{corpus}" for corpus in CORPORA] + [
        "results/audit/data.json"
    ]


def dataset_targets(dataset):
    """Per-dataset outputs up to the reports (the inputs of a corpus' shards)."""
    return [
        f"results/manifests/{dataset}.parquet",
        f"results/frontal/{dataset}.parquet",
        f"results/reports/{dataset}.parquet",
    ]


def clip_enabled():
    return bool(config["clip"]["enabled"])


def clip_shards(wildcards=None):
    """The shard folder CLIP trains and evaluates on (clip.corpus)."""
    corpus = config["clip"]["corpus"]
    if corpus not in CORPORA:
        raise ValueError(
            f"clip.corpus {corpus!r} is not a configured corpus: {CORPORA}"
        )
    return f"results/shards/{corpus}"


def clip_train_settings():
    """The clip block as cxrfoundry.train.clip reads it (model, curator, train)."""
    return {k: config["clip"][k] for k in ("model", "curator", "train")}


def clip_targets():
    """The CLIP model and its zero-shot and retrieval metrics (none when clip.enabled is off)."""
    if not clip_enabled():
        return []
    return [
        "results/models/clip",
        "results/benchmarks/clip/zeroshot.json",
        "results/benchmarks/clip/retrieval.json",
    ]


def evaluated_model(wildcards, input):
    """params.model_dir of an evaluation rule: its `model` input (the MLflow parent run's model)."""
    return input.model


def pipeline_targets():
    """Every output of every stage that exists (what the audit verifies)."""
    return (
        data_targets()
        + clip_targets()
        + dino_targets()
        + chexgen_targets()
        + benchmark_targets()
    )


def all_targets():
    """The default target: the whole pipeline, then its reproducibility audit."""
    return pipeline_targets() + ["results/audit/audit.json"]


# The stage each rules file belongs to, for the audit's run-time table; a rules file not
# listed is its own stage.
STAGE_OF_RULES_FILE = {
    "download": "data",
    "ingest": "data",
    "views": "data",
    "reports": "data",
    "shards": "data",
    "clip": "clip",
    "dino": "dino",
    "generate": "chexgen",
    "benchmarks": "benchmarks",
}


def rule_stages():
    """Rule name -> pipeline stage, for every rule defined so far."""
    return {
        r.name: STAGE_OF_RULES_FILE.get(Path(r.snakefile).stem, Path(r.snakefile).stem)
        for r in workflow.rules
    }


def init_tracking():
    """Create the MLflow store once, before parallel jobs race to migrate it."""
    mlflow_cfg = config.get("mlflow", {})
    if not mlflow_cfg.get("enabled", True):
        return
    from cxrfoundry.tracking import init_store

    init_store(
        mlflow_cfg, mlflow_cfg.get("experiment") or f"cxrfoundry-{config['name']}"
    )
