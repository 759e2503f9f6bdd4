"""Every LIMoE training recipe parses and instantiates (task + datamodule) through its LightningCLI runner."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs" / "train").glob("limoe_*.yaml"))


def _runner():
    spec = importlib.util.spec_from_file_location("limoe_run", REPO / "benchmarks" / "limoe_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_limoe_recipes():
    assert {p.stem for p in RECIPES} >= {"limoe_mnist", "limoe_flickr8k"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_limoe_recipe_instantiates(recipe, tmp_path):
    from lightning.pytorch.cli import LightningCLI

    runner = _runner()
    cli = runner.RecipeCLI(args=["--config", str(recipe), f"--trainer.default_root_dir={tmp_path}"], run=False,
                           auto_configure_optimizers=False, save_config_callback=None)
    assert isinstance(cli, LightningCLI)
    assert type(cli.model).__name__ == "ContrastiveTask"
    assert cli.model.model.config.encoder.moe.num_modalities == 2
    assert type(cli.datamodule).__module__ == "zoo.data.image_text"
