"""Every LIMoE training recipe parses and instantiates (task + datamodule) through train.py's CLI, and
benchmarks/limoe_run.py uses that same CLI."""

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.conftest import load_benchmark
from zoo.tasks.cli import ZooCLI, build_cli

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs" / "train").glob("limoe_*.yaml"))


def _runner():
    return load_benchmark("limoe_run")


def test_there_are_limoe_recipes():
    assert {p.stem for p in RECIPES} >= {"limoe_mnist", "limoe_flickr8k"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_limoe_recipe_instantiates(recipe, tmp_path):
    cli = build_cli(["--config", str(recipe), f"--trainer.default_root_dir={tmp_path}"])
    assert type(cli.model).__name__ == "ContrastiveTask"
    assert cli.model.model.config.encoder.moe.num_modalities == 2
    dm = cli.datamodule
    assert type(dm).__module__ == "zoo.data.image_text"
    # the task took its input geometry from the data as soon as both existed (adapt_to_datamodule)
    overrides = cli.model.hparams.model_overrides
    assert (overrides["image_size"], overrides["in_chans"], overrides["context_length"]) == (
        dm.image_size, dm.in_chans, dm.context_length)
    assert cli.run_name == recipe.stem and cli.run_dir == tmp_path / "runs" / recipe.stem
    # a recipe with `enable_checkpointing: false` runs without the checkpoint callback instead of failing
    has_ckpt = any(isinstance(cb, ModelCheckpoint) for cb in cli.trainer.callbacks)
    assert has_ckpt == ("enable_checkpointing: false" not in recipe.read_text())


def test_limoe_runner_uses_the_train_cli(tmp_path):
    runner = _runner()
    assert issubclass(runner.RecipeCLI, ZooCLI)
    recipe = REPO / "configs" / "train" / "limoe_mnist.yaml"
    cli = build_cli(["--config", str(recipe), "--out", str(tmp_path / "r.json")], cli_class=runner.RecipeCLI,
                    runs_root=tmp_path)
    assert cli.config.out == str(tmp_path / "r.json") and cli.run_dir == tmp_path / "runs" / "limoe_mnist"
    with pytest.raises(SystemExit) as exc:
        runner.main(["--trainer.max_epochs=1"])  # no recipe: said so, not train.py's default digits recipe
    assert exc.value.code == 2


def test_limoe_runner_results_json(tmp_path, shared_dataset):
    """benchmarks/limoe_run.py --out writes the JSON benchmarks/limoe_report.py reads (keys as in the recorded
    results), from a tiny run of the MNIST recipe (real MNIST; skips without)."""
    import json

    mnist = shared_dataset("mnist", "t10k-images-idx3-ubyte.gz")
    out = tmp_path / "run.json"
    args = ["--config", str(REPO / "configs" / "train" / "limoe_mnist.yaml"), f"--trainer.default_root_dir={tmp_path}",
            f"--data.data_dir={mnist.parent}", "--data.batch_size=64", "--data.dataset_kwargs={val_size: 128}",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=2", "--trainer.num_sanity_val_steps=0", "--out", str(out)]
    summary = _runner().main(args)
    recorded = json.loads((REPO / "benchmarks" / "results" / "limoe_mnist.json").read_text())["runs"]["entropy_on"]
    assert json.loads(out.read_text()) == summary
    # `seed` and `metric_unit` were added after the recorded runs (which are in percent)
    assert set(summary) == set(recorded) | {"seed", "metric_unit"} and summary["metric_unit"] == "fraction"
    assert summary["command"] == "python benchmarks/limoe_run.py " + " ".join(args)
    assert summary["run_dir"] == str(tmp_path / "runs" / "limoe_mnist") and summary["global_step"] == 2
    assert set(summary["test_routing"]) == {"block1", "block3"}
    # 2 steps do not train (measured top-1 0.117, top-5 0.523 on the 128 test images): counts over 128 images, top-5
    # well above top-1
    test = summary["test"]
    for key in ("zero_shot_acc", "zero_shot_acc_top5"):
        assert test[key] * 128 == pytest.approx(round(test[key] * 128), abs=1e-3), (key, test[key])
    assert test["zero_shot_acc"] + 0.2 <= test["zero_shot_acc_top5"] <= 0.85, test
    assert sorted(Path(p).name for p in summary["plots"]) == [
        "routing_test_by_modality.png", "routing_test_expert_mix.png", "routing_test_utilisation_image.png",
        "routing_test_utilisation_text.png"]


def test_limoe_report_reads_both_metric_units():
    """benchmarks/limoe_report.py shows percent: recorded runs (no metric_unit, percent) stay as they are, runs in
    fractions (what tasks log now) are scaled, so a new run is never read as 100x worse than a recorded one."""
    import json

    report = load_benchmark("limoe_report")
    recorded = json.loads((REPO / "benchmarks" / "results" / "limoe_mnist.json").read_text())["runs"]["entropy_on"]
    assert "metric_unit" not in recorded and recorded["test"]["zero_shot_acc"] > 1  # recorded in percent
    assert report.in_percent(recorded) == recorded
    new = {"metric_unit": "fraction", "test": {"zero_shot_acc": 0.9, "i2t_R@10": 0.25, "loss": 1.5}, "val": None}
    shown = report.in_percent(new)
    assert shown["test"] == {"zero_shot_acc": 90.0, "i2t_R@10": 25.0, "loss": 1.5} and shown["metric_unit"] == "percent"
    with pytest.raises(ValueError, match="unknown metric_unit"):
        report.in_percent({"metric_unit": "permille"})
