# Downstream benchmarks (issue 7): linear probe / fine-tuning, segmentation, fairness audit,
# synthetic-data utility, the benchmark table and the figures of the Snakemake HTML report.
# Metrics JSONs: results/benchmarks/{model}/{task}.{corpus}.json (DESIGN.md section 3). Config:
# the `benchmarks:` block (docs/benchmarks.md). Included last: benchmark_inputs() collects the
# metrics JSONs of the stages included before (dino_targets(), clip_targets(), ...).
# GPUs: `gpu` defaults to a CPU run here; the Slurm profile sets it (set-resources). Threads:
# one torch thread per job (tiny CPU models), so two jobs share two cores.
include: "benchmarks_common.smk"


rule probe:
    input:
        model=bench_model_input,
        shards="results/shards/{corpus}",
    output:
        metrics="results/benchmarks/{model}/probe_{mode}.{corpus}.json",
        predictions="results/benchmarks/{model}/predictions/probe_{mode}.{corpus}.parquet",
        # Figures come from the job that computed them: a separate plot job would cost more
        # in start-up (torch, MLflow) than the plot itself.
        roc=report(
            "results/plots/{model}/roc_{mode}.{corpus}.png",
            caption="../report/roc.rst",
            category="Classification",
            subcategory="{corpus}",
            labels={"model": "{model}", "probe": "{mode}", "figure": "ROC curves"},
        ),
    log:
        "logs/probe/{model}.{mode}.{corpus}.log",
    benchmark:
        "benchmarks/probe/{model}.{mode}.{corpus}.tsv"
    wildcard_constraints:
        model="[A-Za-z0-9_-]+",
        mode="linear|finetune",
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        backbone=bench_backbone_source,
        model_dir=bench_model_dir,
        settings=bench_probe_settings,
        seed=config["seed"],
        code=code("cxrfoundry.eval.probe", "cxrfoundry.eval.plots"),
    script:
        "../workflow/scripts/probe.py"


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
    wildcard_constraints:
        model="[A-Za-z0-9_-]+",
        head="linear|unet",
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        backbone=bench_backbone_source,
        model_dir=bench_model_dir,
        settings=bench_segment_settings,
        seed=config["seed"],
        code=code("cxrfoundry.eval.probe"),
    script:
        "../workflow/scripts/segment.py"


rule fairness:
    input:
        unpack(bench_fairness_cohorts),
        model=bench_model_input,
        shards="results/shards/{corpus}",
    output:
        metrics="results/benchmarks/{model}/fairness.{corpus}.json",
        bars=report(
            "results/plots/{model}/fairness.{corpus}.png",
            caption="../report/fairness.rst",
            category="Fairness",
            subcategory="{corpus}",
            labels={"model": "{model}", "figure": "subgroup bars"},
        ),
    log:
        "logs/fairness/{model}.{corpus}.log",
    benchmark:
        "benchmarks/fairness/{model}.{corpus}.tsv"
    wildcard_constraints:
        model="[A-Za-z0-9_-]+",
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        backbone=bench_backbone_source,
        model_dir=bench_model_dir,
        settings=BENCH["fairness"]["settings"],
        seed=config["seed"],
        code=code("cxrfoundry.eval.fairness", "cxrfoundry.eval.plots"),
    script:
        "../workflow/scripts/fairness.py"


rule augment:
    input:
        model=bench_model_input,
        shards="results/shards/{corpus}",
        synthetic=bench_augment_cohort,
    output:
        metrics="results/benchmarks/{model}/augment.{corpus}.json",
    log:
        "logs/augment/{model}.{corpus}.log",
    benchmark:
        "benchmarks/augment/{model}.{corpus}.tsv"
    wildcard_constraints:
        model="[A-Za-z0-9_-]+",
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        backbone=bench_backbone_source,
        model_dir=bench_model_dir,
        settings=BENCH["utility"]["settings"],
        seed=config["seed"],
        code=code("cxrfoundry.eval.utility"),
    script:
        "../workflow/scripts/augment.py"


rule synth_pretrain:
    input:
        model=bench_model_input,
        shards="results/shards/{corpus}",
        synthetic=bench_augment_cohort,
    output:
        metrics="results/benchmarks/{model}/synth_pretrain.{corpus}.json",
    log:
        "logs/synth_pretrain/{model}.{corpus}.log",
    benchmark:
        "benchmarks/synth_pretrain/{model}.{corpus}.tsv"
    wildcard_constraints:
        model="[A-Za-z0-9_-]+",
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        backbone=bench_backbone_source,
        model_dir=bench_model_dir,
        settings=BENCH["utility"]["settings"],
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
    wildcard_constraints:
        model="[A-Za-z0-9_-]+",
    conda:
        "../envs/cxrfoundry.yaml"
    params:
        code=code("cxrfoundry.eval.plots"),
    script:
        "../workflow/scripts/bench_plots.py"


rule sample_grid:
    input:
        unpack(bench_sample_cohorts),
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
    conda:
        "../envs/cxrfoundry.yaml"
    params:
        code=code("cxrfoundry.eval.plots"),
    script:
        "../workflow/scripts/bench_plots.py"


rule curation_plot:
    input:
        model="results/models/clip",
    output:
        report(
            "results/plots/clip/curation.png",
            caption="../report/curation.rst",
            category="Data",
            subcategory="CLIP curation",
            labels={"figure": "curation statistics"},
        ),
    log:
        "logs/curation_plot/clip.log",
    conda:
        "../envs/cxrfoundry.yaml"
    params:
        code=code("cxrfoundry.eval.plots"),
    script:
        "../workflow/scripts/bench_plots.py"


rule ablation_plot:
    input:
        metrics=benchmark_inputs,
        dino=ablation_inputs,
    output:
        report(
            "results/plots/ablation.png",
            caption="../report/ablation.rst",
            category="Summary",
            labels={"table": "ablations"},
        ),
    log:
        "logs/ablation_plot/all.log",
    conda:
        "../envs/cxrfoundry.yaml"
    params:
        code=code("cxrfoundry.eval.plots", "cxrfoundry.eval.table"),
    script:
        "../workflow/scripts/bench_plots.py"


rule benchmark_table:
    input:
        metrics=benchmark_inputs,
        predictions=benchmark_predictions,
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
    conda:
        "../envs/cxrfoundry.yaml"
    params:
        models_dir="results/models",
        n_boot=benchmark_table_boot(),
        seed=config["seed"],
        code=code("cxrfoundry.eval.table", "cxrfoundry.eval.plots"),
    script:
        "../workflow/scripts/benchmark_table.py"
