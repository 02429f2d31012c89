"""The recipe table of bench/dino_recipes.py stays valid against the committed demo config."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from cxrfoundry.config import deep_merge
from cxrfoundry.train.augment import AugmentConfig
from cxrfoundry.train.dino import resolve_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def recipes():
    spec = importlib.util.spec_from_file_location("dino_recipes", ROOT / "bench/dino_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_pretrain() -> dict:
    return yaml.safe_load((ROOT / "config/config.yaml").read_text())["dino"]["pretrain"]


def test_every_recipe_is_a_valid_dino_config(recipes, demo_pretrain) -> None:
    for name, patch in recipes.RECIPES.items():
        cfg = resolve_config(deep_merge(demo_pretrain, patch))
        AugmentConfig.from_dict(cfg["augment"])
        assert cfg["masking"]["ratio"][0] < cfg["masking"]["ratio"][1], name


def test_chosen_recipe_is_the_committed_demo_recipe(recipes, demo_pretrain) -> None:
    chosen = deep_merge(demo_pretrain, recipes.RECIPES["chosen"])
    assert chosen == demo_pretrain
    assert chosen["lr"] == 1e-3 and chosen["loss_weights"]["ibot"] == 2.0
    assert chosen["masking"] == {"probability": 1.0, "ratio": [0.3, 0.7]}


def test_previous_recipe_restores_the_earlier_settings(recipes, demo_pretrain) -> None:
    previous = resolve_config(deep_merge(demo_pretrain, recipes.RECIPES["previous"]))
    assert previous["lr"] == 5e-4
    assert previous["loss_weights"] == {"dino": 1.0, "ibot": 1.0, "koleo": 0.1}
    assert previous["masking"] == {"probability": 0.5, "ratio": [0.1, 0.5]}
    # Everything not in the patch is the demo's, e.g. the crops.
    assert previous["augment"] == resolve_config(demo_pretrain)["augment"]
