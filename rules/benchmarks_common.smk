# Config helpers of the benchmarks stage (rules/benchmarks.smk): models, cohorts, targets.
import sys

BENCH = config["benchmarks"]
BENCH_COHORT_ROLES = ("test", "augment", "balance")


def bench_enabled():
    return bool(BENCH["enabled"])


def bench_corpora():
    """Corpora the benchmarks run on (each must be a configured corpus)."""
    unknown = sorted(set(BENCH["corpora"]) - set(CORPORA))
    if unknown:
        raise ValueError(
            f"benchmarks.corpora names unknown corpora {unknown}; configured: {CORPORA}"
        )
    return list(BENCH["corpora"])


def bench_backbone_source(wildcards):
    """What a benchmark loads: an HF folder, or a random-init backbone config (baseline)."""
    model = wildcards.model
    explicit = BENCH["backbones"].get(model)
    if explicit is not None:
        return explicit
    if model.endswith("random"):
        return BENCH["random_backbone"] or DINO.get("pretrain", {}).get("backbone", {})
    if model == "clip":
        return "results/models/clip/vision"
    return f"results/models/{model}/backbone"


def bench_model_input(wildcards):
    """The model folder a benchmark job depends on (none for random-init or external ones)."""
    model = wildcards.model
    if model.endswith("random") or model in BENCH["backbones"]:
        return []
    return f"results/models/{model}"


def bench_model_dir(wildcards):
    """Model folder for FLOPs / samples seen and the MLflow parent run (None if there is none)."""
    return bench_model_input(wildcards) or None


def bench_probe_settings(wildcards):
    """Probe settings of the job's mode: settings, then per_mode[mode] over them."""
    probe = BENCH["probe"]
    return {
        **probe["settings"],
        **probe["per_mode"][wildcards.mode],
        "mode": wildcards.mode,
    }


def bench_segment_settings(wildcards):
    """Segmentation settings of the job's head: settings, then per_head[head] over them."""
    seg = BENCH["segment"]
    return {
        **seg["settings"],
        **seg["per_head"][wildcards.head],
        "head": wildcards.head,
    }


def bench_cohort_corpus():
    """The corpus the top-level cohorts were matched to (their real counterpart)."""
    return BENCH["cohorts"]["corpus"] or (BENCH["corpora"] or [None])[0]


def _bench_cohorts():
    """{corpus: {role: results/cohorts/{name}}} of the configured cohorts that can exist here.

    The top-level roles belong to cohorts.corpus, per_corpus names those of other corpora. A
    cohort needs rule synthesize_cohort (the ChexGen stage) or an existing folder; one that has
    neither is left out with a warning, so the rest of the stage still runs.
    """
    if not bench_enabled():
        return {}
    wanted = {
        bench_cohort_corpus(): {r: BENCH["cohorts"].get(r) for r in BENCH_COHORT_ROLES}
    }
    for corpus, roles in BENCH["cohorts"]["per_corpus"].items():
        wanted.setdefault(corpus, {}).update(roles)
    can_make = any(r.name == "synthesize_cohort" for r in workflow.rules)
    found = {}
    for corpus, roles in wanted.items():
        for role, name in roles.items():
            if not name:
                continue
            folder = f"results/cohorts/{name}"
            if can_make or os.path.isdir(folder):
                found.setdefault(corpus, {})[role] = folder
            else:
                print(
                    f"benchmarks: cohort {role}={name!r} of corpus {corpus!r} left out: no "
                    f"rule synthesize_cohort and no {folder}/",
                    file=sys.stderr,
                )
    return found


BENCH_COHORTS = _bench_cohorts()


def bench_cohort(corpus, role):
    """results/cohorts/{name} of a synthetic cohort role of a corpus, or None."""
    return BENCH_COHORTS.get(corpus, {}).get(role)


def _cohorts_of(wildcards, roles):
    return {
        r: bench_cohort(wildcards.corpus, r)
        for r in roles
        if bench_cohort(wildcards.corpus, r)
    }


def bench_fairness_cohorts(wildcards):
    """The synthetic test cohort and balancing pool of the fairness audit, where configured."""
    return _cohorts_of(wildcards, ("test", "balance"))


def bench_sample_cohorts(wildcards):
    """The synthetic test cohort shown beside the real test images, where configured."""
    return _cohorts_of(wildcards, ("test",))


def bench_augment_cohort(wildcards):
    """The augmentation cohort of the job's corpus (matched to its train split)."""
    found = bench_cohort(wildcards.corpus, "augment")
    if found is None:
        raise ValueError(
            f"rules augment/synth_pretrain need an augment cohort for corpus {wildcards.corpus!r}"
        )
    return found


def bench_utility_corpora():
    """Corpora with an augmentation cohort (the utility experiments run there)."""
    return sorted(c for c, roles in BENCH_COHORTS.items() if "augment" in roles)


def _bench_sub_corpora(block):
    """benchmarks.{block}.corpora (configured corpora), else benchmarks.corpora."""
    corpora = BENCH[block]["corpora"]
    if corpora is None:
        return bench_corpora()
    unknown = sorted(set(corpora) - set(CORPORA))
    if unknown:
        raise ValueError(f"benchmarks.{block}.corpora names unknown corpora {unknown}")
    return list(corpora)


def bench_fairness_corpora():
    """Corpora of the fairness audit (benchmarks.fairness.corpora, else benchmarks.corpora)."""
    return _bench_sub_corpora("fairness")


def bench_segment_corpora():
    """Corpora of the segmentation benchmark (benchmarks.segment.corpora, else .corpora)."""
    return _bench_sub_corpora("segment")


def benchmark_metric_targets():
    """Every metrics JSON this stage writes under the config."""
    if not bench_enabled():
        return []
    out = []
    for corpus in bench_corpora():
        for model in BENCH["models"]:
            out += [
                f"results/benchmarks/{model}/probe_{mode}.{corpus}.json"
                for mode in BENCH["probe"]["modes"]
            ]
    for corpus in bench_segment_corpora():
        for model in BENCH["models"]:
            out += [
                f"results/benchmarks/{model}/seg_{head}.{corpus}.json"
                for head in BENCH["segment"]["heads"]
            ]
    for corpus in bench_fairness_corpora():
        for model in BENCH["fairness"]["models"]:
            out.append(f"results/benchmarks/{model}/fairness.{corpus}.json")
    for corpus in bench_utility_corpora():
        for model in BENCH["utility"]["models"]:
            out += [
                f"results/benchmarks/{model}/augment.{corpus}.json",
                f"results/benchmarks/{model}/synth_pretrain.{corpus}.json",
            ]
    return out


def benchmark_plot_targets():
    """Report figures: ROC curves, fairness bars, utility plots, sample grids, curation."""
    if not bench_enabled():
        return []
    out = []
    for corpus in bench_corpora():
        for model in BENCH["models"]:
            out += [
                f"results/plots/{model}/roc_{mode}.{corpus}.png"
                for mode in BENCH["probe"]["modes"]
            ]
        out.append(f"results/plots/samples.{corpus}.png")
    for corpus in bench_fairness_corpora():
        for model in BENCH["fairness"]["models"]:
            out.append(f"results/plots/{model}/fairness.{corpus}.png")
    for corpus in bench_utility_corpora():
        for model in BENCH["utility"]["models"]:
            out.append(f"results/plots/{model}/utility.{corpus}.png")
    if clip_enabled():
        out.append("results/plots/clip/curation.png")
    out.append("results/plots/ablation.png")
    return out


def benchmark_stage_metrics():
    """Metrics JSONs of the other stages in the default target (DINO, CLIP, ChexGen, ...)."""
    files = []
    for name in ("dino_targets", "clip_targets", "chexgen_targets", "generate_targets"):
        targets = globals().get(name)
        if targets is not None:
            files += [
                f
                for f in targets()
                if f.startswith("results/benchmarks/") and f.endswith(".json")
            ]
    return files


def benchmark_predictions(wildcards):
    """The probes' predictions tables (the table's paired gains over the random baseline)."""
    if not bench_enabled():
        return []
    return [
        f"results/benchmarks/{model}/predictions/probe_{mode}.{corpus}.parquet"
        for corpus in bench_corpora()
        for model in BENCH["models"]
        for mode in BENCH["probe"]["modes"]
    ]


def benchmark_table_boot():
    """Bootstrap replicates of the table's paired gains: the probes' own count."""
    return int(BENCH["probe"]["settings"].get("bootstrap", 1000))


def benchmark_inputs(wildcards):
    """Metrics JSONs for the table: this stage's plus the other stages' that are configured."""
    return sorted(set(benchmark_metric_targets() + benchmark_stage_metrics()))


def ablation_inputs(wildcards):
    """The DINO ablation summary when benchmarks.report.dino_ablation asks for it."""
    if BENCH["report"]["dino_ablation"] and dino_enabled():
        return ["results/benchmarks/dino_ablation.json"]
    return []


def benchmark_targets():
    """The benchmark stage's outputs (none unless benchmarks.enabled)."""
    if not bench_enabled():
        return []
    return (
        benchmark_metric_targets()
        + benchmark_plot_targets()
        + [
            "results/benchmarks/summary.csv",
            "results/benchmarks/summary.md",
            "results/plots/summary.png",
        ]
    )
