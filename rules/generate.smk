# ChexGen: VAE → feature cache → latent diffusion (stage I, stage II) → ControlNet, then
# synthetic cohorts (one job per config/cohorts/{cohort}.yaml) and generation-quality metrics.
# Model folders follow the diffusers save_pretrained layout; training checkpoints live beside
# them (results/models/.{name}.ckpt) so a retried job resumes after Snakemake deletes outputs.
# GPUs: `gpu` defaults to a CPU run here; the Slurm profile sets it (set-resources).
# Threads: one torch thread per job (tiny CPU models run fastest so on a shared box, and two
# jobs fit on two cores); the profile may raise it (set-threads). Priority 1 marks the critical
# path (VAE → features → LDM → ControlNet → cohorts, which the benchmarks wait for): it runs
# before the judges and probes when cores are short.
include: "generate_common.smk"


wildcard_constraints:
    cohort="|".join(COHORT_SPECS) or "NO_COHORT",


rule pretrain_vae:
    input:
        shards=chexgen_shards,
    output:
        model=directory("results/models/chexgen_vae"),
    log:
        "logs/pretrain_vae/chexgen_vae.log",
    benchmark:
        "benchmarks/pretrain_vae/chexgen_vae.tsv"
    priority: 1
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        settings=CHEXGEN["vae"],
        seed=config["seed"],
        code=code("cxrfoundry.train.diffusion", "cxrfoundry.generate.vae"),
    script:
        "../workflow/scripts/pretrain_vae.py"


rule encode_features:
    input:
        shards=feature_shards,
        vae="results/models/chexgen_vae",
    output:
        features=directory("results/features/chexgen/{stage}"),
    log:
        "logs/encode_features/{stage}.log",
    benchmark:
        "benchmarks/encode_features/{stage}.tsv"
    wildcard_constraints:
        stage="|".join(FEATURE_STAGES),
    priority: 1
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        settings=feature_settings,
        split="train",
        text_encoder=CHEXGEN["text_encoder"],
        max_tokens=CHEXGEN["max_tokens"],
        code=code("cxrfoundry.generate.features"),
    script:
        "../workflow/scripts/encode_features.py"


rule pretrain_ldm_stage1:
    input:
        features="results/features/chexgen/stage1",
        vae="results/models/chexgen_vae",
    output:
        model=directory("results/models/chexgen_stage1"),
    log:
        "logs/pretrain_ldm/chexgen_stage1.log",
    benchmark:
        "benchmarks/pretrain_ldm/chexgen_stage1.tsv"
    priority: 1
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        settings=ldm_settings("stage1"),
        seed=config["seed"],
        code=code("cxrfoundry.train.diffusion", "cxrfoundry.generate.pipeline"),
    script:
        "../workflow/scripts/pretrain_ldm.py"


rule pretrain_ldm_stage2:
    input:
        features="results/features/chexgen/stage2",
        vae="results/models/chexgen_vae",
        init="results/models/chexgen_stage1",
    output:
        model=directory("results/models/chexgen"),
    log:
        "logs/pretrain_ldm/chexgen.log",
    benchmark:
        "benchmarks/pretrain_ldm/chexgen.tsv"
    priority: 1
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        settings=ldm_settings("stage2"),
        seed=config["seed"] + 1,
        code=code("cxrfoundry.train.diffusion", "cxrfoundry.generate.pipeline"),
    script:
        "../workflow/scripts/pretrain_ldm.py"


rule train_controlnet:
    input:
        features="results/features/chexgen/controlnet",
        base="results/models/chexgen",
    output:
        model=directory("results/models/chexgen_controlnet"),
    log:
        "logs/train_controlnet/chexgen_controlnet.log",
    benchmark:
        "benchmarks/train_controlnet/chexgen_controlnet.tsv"
    priority: 1
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        settings=CHEXGEN["controlnet"],
        seed=config["seed"] + 2,
        code=code("cxrfoundry.train.diffusion", "cxrfoundry.generate.controlnet"),
    script:
        "../workflow/scripts/train_controlnet.py"


rule synthesize_cohort:
    input:
        unpack(cohort_inputs),
    output:
        cohort=directory("results/cohorts/{cohort}"),
    log:
        "logs/synthesize_cohort/{cohort}.log",
    benchmark:
        "benchmarks/synthesize_cohort/{cohort}.tsv"
    priority: 1
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        schema=COHORT_SCHEMA,
        sampling=CHEXGEN["sampling"],
        shard_settings=config["shards"],
        image_size=cohort_image_size,
        seed=config["seed"],
        code=code("cxrfoundry.generate.cohorts", "cxrfoundry.generate.pipeline"),
    script:
        "../workflow/scripts/synthesize_cohort.py"


# The judges of generation quality, trained on real images with the downstream heads.
rule train_quality_classifier:
    input:
        shards=chexgen_shards,
    output:
        model=directory("results/models/cxr_classifier"),
    log:
        "logs/train_quality_classifier/cxr_classifier.log",
    benchmark:
        "benchmarks/train_quality_classifier/cxr_classifier.tsv"
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        task="classifier",
        settings=QUALITY["classifier"],
        seed=config["seed"] + 3,
        code=code("cxrfoundry.generate.quality", "cxrfoundry.train.finetune"),
    script:
        "../workflow/scripts/train_quality_judge.py"


rule train_quality_segmenter:
    input:
        shards=chexgen_shards,
    output:
        model=directory("results/models/cxr_segmenter"),
    log:
        "logs/train_quality_segmenter/cxr_segmenter.log",
    benchmark:
        "benchmarks/train_quality_segmenter/cxr_segmenter.tsv"
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        task="segmenter",
        settings=QUALITY["segmenter"],
        seed=config["seed"] + 4,
        code=code("cxrfoundry.generate.quality", "cxrfoundry.train.finetune"),
    script:
        "../workflow/scripts/train_quality_judge.py"


rule generation_quality:
    input:
        unpack(quality_inputs),
    output:
        metrics="results/benchmarks/chexgen/generation_quality.json",
        grid=report(
            "results/plots/chexgen/real_vs_synthetic.png",
            caption="../report/chexgen_grid.rst",
            category="Generation",
            labels={"model": "chexgen", "figure": "real vs synthetic"},
        ),
    log:
        "logs/generation_quality/chexgen.log",
    benchmark:
        "benchmarks/generation_quality/chexgen.tsv"
    conda:
        "../envs/cxrfoundry.yaml"
    threads: 1
    resources:
        gpu=0,
    params:
        settings=quality_settings,
        sampling=CHEXGEN["sampling"],
        dataset=quality_dataset,
        seed=config["seed"],
        code=code("cxrfoundry.generate.quality", "cxrfoundry.generate.cohorts"),
    script:
        "../workflow/scripts/generation_quality.py"
