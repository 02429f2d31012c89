"""DINO recipe search on the demo corpus: pretrain with a patch over ``dino.pretrain``, probe on
val and test.

Each recipe is a patch over the config's ``dino.pretrain`` block, merged as the workflow merges
its ablation variants (:func:`cxrfoundry.config.deep_merge`). The recipe is *chosen on the
validation split*; the test figure is reported beside it and is not used for the choice.
``random`` scores the same architecture randomly initialised (the baseline). One JSON line per
recipe goes to ``--out``; recipes already there (same name and seed) are skipped, so an
interrupted search picks up where it stopped.

    python bench/dino_recipes.py --shards results/shards/demo --work /tmp/dino_recipes \
        --out dino_recipes.jsonl random previous chosen chosen_e20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from cxrfoundry.config import deep_merge
from cxrfoundry.train.dino import train_dino
from cxrfoundry.train.finetune import finetune_classification

_PREVIOUS = {
    "lr": 5e-4,
    "loss_weights": {"ibot": 1.0, "koleo": 0.1},
    "masking": {"probability": 0.5, "ratio": [0.1, 0.5]},
}
_MASK_ALL = {"probability": 1.0, "ratio": [0.2, 0.5]}

#: The rows of docs/dino.md's table: name -> patch over the committed ``dino.pretrain``.
RECIPES: dict[str, dict[str, Any]] = {
    "random": {},
    "previous": _PREVIOUS,
    "previous_affine": {
        **_PREVIOUS,
        "augment": {
            "global_scale": [0.5, 1.0],
            "affine_p": 0.8,
            "rotate_deg": 10,
            "translate": 0.05,
            "affine_scale": [0.9, 1.1],
        },
    },
    "lr1e-3": {**_PREVIOUS, "lr": 1e-3},
    "ibot2": {**_PREVIOUS, "loss_weights": {"ibot": 2.0, "koleo": 0.1}, "masking": _MASK_ALL},
    "lr1e-3_ibot2": {"lr": 1e-3, "masking": _MASK_ALL},
    "lr2e-3_ibot2": {"lr": 2e-3, "masking": _MASK_ALL},
    "lr1e-3_ibot4": {"loss_weights": {"ibot": 4.0, "koleo": 0.1}, "masking": _MASK_ALL},
    "chosen": {},
    "chosen_masks40-80": {"masking": {"probability": 1.0, "ratio": [0.4, 0.8]}},
    "chosen_ibot4": {"loss_weights": {"ibot": 4.0, "koleo": 0.1}},
    "chosen_e20": {"epochs": 20},
}


def run_recipe(name: str, args: argparse.Namespace, dino_cfg: dict[str, Any]) -> dict[str, Any]:
    """Pretrain recipe ``name`` (unless it is ``random``) and probe it on val and test."""
    pretrain = deep_merge(dino_cfg["pretrain"], RECIPES[name])
    work = args.work / f"{name}_seed{args.seed}"
    start = time.perf_counter()
    if name == "random":
        backbone: Any = pretrain["backbone"]
    else:
        backbone = work / "model" / "backbone"
        if not (work / "model" / "metrics.json").exists():
            train_dino(args.shards, work / "model", pretrain, seed=args.seed, work_dir=work)
    pretrain_s = time.perf_counter() - start
    scores = {}
    for split in ("val", "test"):
        probe = {**dino_cfg["finetune"]["cls"], "test_split": split}
        record = finetune_classification(
            args.shards, backbone, work / f"{split}.json", probe, seed=args.seed, model_name=name
        )
        scores[split] = [round(record[k], 4) for k in ("value", "ci_low", "ci_high")]
    return {
        "name": name,
        "seed": args.seed,
        "patch": RECIPES[name],
        "pretrain_s": round(pretrain_s),
        **scores,
    }


def main() -> None:
    """Run the requested recipes and append one JSON line each to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--shards", type=Path, default=Path("results/shards/demo"))
    parser.add_argument("--work", type=Path, default=Path("results/.work/dino_recipes"))
    parser.add_argument("--out", type=Path, default=Path("dino_recipes.jsonl"))
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the workflow's rules: faster than two threads on 2 cores
    dino_cfg = yaml.safe_load(args.config.read_text())["dino"]
    done = set()
    if args.out.exists():
        done = {(r["name"], r["seed"]) for r in map(json.loads, args.out.read_text().splitlines())}
    for name in args.recipes:
        if (name, args.seed) in done:
            continue
        result = run_recipe(name, args, dino_cfg)
        print(json.dumps(result))
        with args.out.open("a") as out:
            out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
