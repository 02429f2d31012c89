# ChexGen: VAE → feature cache → latent diffusion (stage I, stage II) → ControlNet.
# Model folders follow the diffusers save_pretrained layout; training checkpoints live beside
# them (results/models/.{name}.ckpt) so a retried job resumes after Snakemake deletes outputs.
# GPUs: `gpu` defaults to a CPU run here; the Slurm profile sets it (set-resources).


rule pretrain_vae:
    input:
        shards=f"results/shards/{config['chexgen']['corpus']}",
    output:
        model=directory("results/models/chexgen_vae"),
    log:
        "logs/pretrain_vae/chexgen_vae.log",
    conda:
        "../envs/cxrfoundry.yaml"
    benchmark:
        "benchmarks/pretrain_vae/chexgen_vae.tsv"
    resources:
        gpu=0,
    params:
        settings=config["chexgen"]["vae"],
        seed=config["seed"],
        code=code("cxrfoundry.train.diffusion", "cxrfoundry.generate.vae"),
    script:
        "../workflow/scripts/pretrain_vae.py"


rule encode_features:
    input:
        shards=lambda wc: f"results/shards/{config['chexgen']['features'][wc.stage]['corpus']}",
        vae="results/models/chexgen_vae",
    output:
        features=directory("results/features/chexgen/{stage}"),
    log:
        "logs/encode_features/{stage}.log",
    conda:
        "../envs/cxrfoundry.yaml"
    benchmark:
        "benchmarks/encode_features/{stage}.tsv"
    wildcard_constraints:
        stage="stage1|stage2|controlnet",
    resources:
        gpu=0,
    params:
        settings=lambda wc: config["chexgen"]["features"][wc.stage],
        split="train",
        text_encoder=config["chexgen"]["text_encoder"],
        max_tokens=config["chexgen"]["max_tokens"],
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
    conda:
        "../envs/cxrfoundry.yaml"
    benchmark:
        "benchmarks/pretrain_ldm/chexgen_stage1.tsv"
    resources:
        gpu=0,
    params:
        settings={**config["chexgen"]["ldm"], **config["chexgen"]["ldm"]["stage1"]},
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
    conda:
        "../envs/cxrfoundry.yaml"
    benchmark:
        "benchmarks/pretrain_ldm/chexgen.tsv"
    resources:
        gpu=0,
    params:
        settings={**config["chexgen"]["ldm"], **config["chexgen"]["ldm"]["stage2"]},
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
    conda:
        "../envs/cxrfoundry.yaml"
    benchmark:
        "benchmarks/train_controlnet/chexgen_controlnet.tsv"
    resources:
        gpu=0,
    params:
        settings=config["chexgen"]["controlnet"],
        seed=config["seed"] + 2,
        code=code("cxrfoundry.train.diffusion", "cxrfoundry.generate.controlnet"),
    script:
        "../workflow/scripts/train_controlnet.py"
