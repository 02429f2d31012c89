# Downstream benchmarks (issue 7): linear probe / fine-tuning, segmentation, fairness audit,
# synthetic-data utility, the benchmark table and the figures of the Snakemake HTML report.
# Metrics JSONs: results/benchmarks/{model}/{task}.{corpus}.json (DESIGN.md section 3).
# Config: the `benchmarks:` block (docs/benchmarks.md). GPUs: `gpu` defaults to a CPU run here;
# the Slurm profile sets it (set-resources), like the training stages.
BENCH = config.get("benchmarks", {})
BENCH_MODELS = list(BENCH.get("models", []))
BENCH_CORPORA = list(BENCH.get("datasets", []))
BENCH_COHORTS = BENCH.get("cohorts", {}) or {}


def bench_backbone_source(wildcards):
    """What the benchmark loads: an HF folder, or a random-init backbone config (baseline)."""
    model = wildcards.model
    explicit = (BENCH.get("backbones") or {}).get(model)
    if explicit is not None:
        return explicit
    if model.endswith("random"):
        default = config.get("dino", {}).get("pretrain", {}).get("backbone", {})
        return BENCH.get("random_backbone") or default
    if model == "clip":
        return f"results/models/clip/vision"
    return f"results/models/{model}/backbone"


def bench_model_input(wildcards):
    """The model folder a benchmark job depends on (none for random-init or external ones)."""
    model = wildcards.model
    if model.endswith("random") or model in (BENCH.get("backbones") or {}):
        return []
    return f"results/models/{model}"


def bench_model_dir(wildcards):
    found = bench_model_input(wildcards)
    return found or None


def bench_cohort(role):
    """results/cohorts/{name} of a synthetic cohort role (test, balance, augment), or None."""
    name = BENCH_COHORTS.get(role)
    return f"results/cohorts/{name}" if name else None


def bench_cohort_inputs(*roles):
    return {r: bench_cohort(r) for r in roles if bench_cohort(r)}


def benchmark_metric_targets():
    """Every metrics JSON this stage writes under the config."""
    if not BENCH:
        return []
    out = []
    for corpus in BENCH_CORPORA:
        for model in BENCH_MODELS:
            out += [
                f"results/benchmarks/{model}/probe_{mode}.{corpus}.json"
                for mode in BENCH.get("probe", {}).get("modes", ["linear"])
            ]
            out += [
                f"results/benchmarks/{model}/seg_{head}.{corpus}.json"
                for head in BENCH.get("segment", {}).get("heads", [])
            ]
        for model in BENCH.get("fairness", {}).get("models", []):
            out.append(f"results/benchmarks/{model}/fairness.{corpus}.json")
        if bench_cohort("augment"):
            for model in BENCH.get("utility", {}).get("models", []):
                out += [
                    f"results/benchmarks/{model}/augment.{corpus}.json",
                    f"results/benchmarks/{model}/synth_pretrain.{corpus}.json",
                ]
    return out


def benchmark_plot_targets():
    """Report figures: ROC curves, fairness bars, utility plots, sample grids."""
    if not BENCH:
        return []
    out = []
    for corpus in BENCH_CORPORA:
        for model in BENCH_MODELS:
            out += [
                f"results/plots/{model}/roc_{mode}.{corpus}.png"
                for mode in BENCH.get("probe", {}).get("modes", ["linear"])
            ]
        for model in BENCH.get("fairness", {}).get("models", []):
            out.append(f"results/plots/{model}/fairness.{corpus}.png")
        if bench_cohort("augment"):
            for model in BENCH.get("utility", {}).get("models", []):
                out.append(f"results/plots/{model}/utility.{corpus}.png")
        out.append(f"results/plots/samples.{corpus}.png")
    return out


def benchmark_inputs(wildcards=None):
    """Metrics JSONs for the table: this stage's plus the other stages' that are configured."""
    files = list(benchmark_metric_targets())
    for name in ("dino_targets", "clip_targets"):
        fn = globals().get(name)
        if fn is not None:
            files += [f for f in fn() if f.startswith("results/benchmarks/") and f.endswith(".json")]
    return sorted(set(files))


def benchmark_targets():
    """The benchmark stage's outputs (empty without a `benchmarks:` config block)."""
    if not BENCH:
        return []
    return benchmark_plot_targets() + [
        "results/benchmarks/summary.csv",
        "results/benchmarks/summary.md",
        "results/plots/summary.png",
    ]


wildcard_constraints:
    mode="linear|finetune",
    head="linear|unet",


rule probe:
    input:
        model=bench_model_input,
        shards="results/shards/{corpus}",
    output:
        metrics="results/benchmarks/{model}/probe_{mode}.{corpus}.json",
        predictions="results/benchmarks/{model}/predictions/probe_{mode}.{corpus}.parquet",
    log:
        "logs/probe/{model}.{mode}.{corpus}.log",
    benchmark:
        "benchmarks/probe/{model}.{mode}.{corpus}.tsv"
    threads: 2
    resources:
        gpu=0,
    params:
        backbone=bench_backbone_source,
        model_dir=bench_model_dir,
        settings=lambda wc: {**BENCH.get("probe", {}).get("settings", {}), "mode": wc.mode},
        seed=config["seed"],
        code=code("cxrfoundry.eval.probe"),
    script:
        "../workflow/scripts/probe.py"


rule roc_plot:
    input:
        predictions="results/benchmarks/{model}/predictions/probe_{mode}.{corpus}.parquet",
    output:
        report(
            "results/plots/{model}/roc_{mode}.{corpus}.png",
            caption="../report/roc.rst",
            category="Classification",
            subcategory="{corpus}",
            labels={"model": "{model}", "probe": "{mode}", "figure": "ROC curves"},
        ),
    log:
        "logs/roc_plot/{model}.{mode}.{corpus}.log",
    params:
        code=code("cxrfoundry.eval.plots"),
    script:
        "../workflow/scripts/bench_plots.py"


rule segment:
    input:
        model=bench_model_input,
        shards="results/shards/{corpus}",
    output:
        metrics="results/benchmarks/{model}/seg_{head}.{corpus}.json",
    log:
        "logs/segment/{model}.{head}.{corpus}.log",
    benchmark:
        "benchmarks/segment/{model}.{head}.{corpus}.tsv"
    threads: 2
    resources:
        gpu=0,
    params:
        backbone=bench_backbone_source,
        model_dir=bench_model_dir,
        settings=lambda wc: {**BENCH.get("segment", {}).get("settings", {}), "head": wc.head},
        seed=config["seed"],
        code=code("cxrfoundry.eval.probe"),
    script:
        "../workflow/scripts/segment.py"


rule fairness:
    input:
        unpack(lambda wc: bench_cohort_inputs("test", "balance")),
        model=bench_model_input,
        shards="results/shards/{corpus}",
    output:
        metrics="results/benchmarks/{model}/fairness.{corpus}.json",
    log:
        "logs/fairness/{model}.{corpus}.log",
    benchmark:
        "benchmarks/fairness/{model}.{corpus}.tsv"
    threads: 2
    resources:
        gpu=0,
    params:
        backbone=bench_backbone_source,
        settings=BENCH.get("fairness", {}).get("settings", {}),
        seed=config["seed"],
        code=code("cxrfoundry.eval.fairness"),
    script:
        "../workflow/scripts/fairness.py"


rule fairness_plot:
    input:
        metrics="results/benchmarks/{model}/fairness.{corpus}.json",
    output:
        report(
            "results/plots/{model}/fairness.{corpus}.png",
            caption="../report/fairness.rst",
            category="Fairness",
            subcategory="{corpus}",
            labels={"model": "{model}", "figure": "subgroup bars"},
        ),
    log:
        "logs/fairness_plot/{model}.{corpus}.log",
    params:
        code=code("cxrfoundry.eval.plots"),
    script:
        "../workflow/scripts/bench_plots.py"


rule augment:
    input:
        model=bench_model_input,
        shards="results/shards/{corpus}",
        synthetic=bench_cohort("augment") or "results/cohorts/NO_AUGMENT_COHORT",
    output:
        metrics="results/benchmarks/{model}/augment.{corpus}.json",
    log:
        "logs/augment/{model}.{corpus}.log",
    benchmark:
        "benchmarks/augment/{model}.{corpus}.tsv"
    threads: 2
    resources:
        gpu=0,
    params:
        backbone=bench_backbone_source,
        settings=BENCH.get("utility", {}).get("settings", {}),
        seed=config["seed"],
        code=code("cxrfoundry.eval.utility"),
    script:
        "../workflow/scripts/augment.py"


rule synth_pretrain:
    input:
        model=bench_model_input,
        shards="results/shards/{corpus}",
        synthetic=bench_cohort("augment") or "results/cohorts/NO_AUGMENT_COHORT",
    output:
        metrics="results/benchmarks/{model}/synth_pretrain.{corpus}.json",
    log:
        "logs/synth_pretrain/{model}.{corpus}.log",
    benchmark:
        "benchmarks/synth_pretrain/{model}.{corpus}.tsv"
    threads: 2
    resources:
        gpu=0,
    params:
        backbone=bench_backbone_source,
        settings=BENCH.get("utility", {}).get("settings", {}),
        seed=config["seed"],
        code=code("cxrfoundry.eval.utility"),
    script:
        "../workflow/scripts/augment.py"


rule utility_plot:
    input:
        augment="results/benchmarks/{model}/augment.{corpus}.json",
        pretrain="results/benchmarks/{model}/synth_pretrain.{corpus}.json",
    output:
        report(
            "results/plots/{model}/utility.{corpus}.png",
            caption="../report/utility.rst",
            category="Synthetic data utility",
            subcategory="{corpus}",
            labels={"model": "{model}", "figure": "augmentation and pretraining"},
        ),
    log:
        "logs/utility_plot/{model}.{corpus}.log",
    params:
        code=code("cxrfoundry.eval.plots"),
    script:
        "../workflow/scripts/bench_plots.py"


rule sample_grid:
    input:
        unpack(lambda wc: bench_cohort_inputs("test")),
        shards="results/shards/{corpus}",
    output:
        report(
            "results/plots/samples.{corpus}.png",
            caption="../report/samples.rst",
            category="Data",
            subcategory="{corpus}",
            labels={"figure": "real vs synthetic samples"},
        ),
    log:
        "logs/sample_grid/{corpus}.log",
    params:
        code=code("cxrfoundry.eval.plots"),
    script:
        "../workflow/scripts/bench_plots.py"


rule benchmark_table:
    input:
        metrics=benchmark_inputs,
    output:
        csv=report(
            "results/benchmarks/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
            labels={"table": "all benchmarks (CSV)"},
        ),
        md="results/benchmarks/summary.md",
        figure=report(
            "results/plots/summary.png",
            caption="../report/summary.rst",
            category="Summary",
            labels={"table": "all benchmarks"},
        ),
    log:
        "logs/benchmark_table/all.log",
    params:
        models_dir="results/models",
        code=code("cxrfoundry.eval.table", "cxrfoundry.eval.plots"),
    script:
        "../workflow/scripts/benchmark_table.py"
