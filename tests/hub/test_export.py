"""``python -m zoo.tasks.publish export``: Lightning checkpoint of ImageClassificationTask -> weights folder, manifest
entry and preset ``pretrained:`` tag, then ``create_model(name, pretrained=True)`` gives the task's logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import zoo
from zoo import hub
from zoo.tasks import publish
from zoo.config import ConfigError
from zoo.registry import configs_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path, monkeypatch):
    cfg = tmp_path / "configs" / "models" / "vmoe"
    cfg.mkdir(parents=True)
    shutil.copy(configs_dir() / "models" / "vmoe" / "vmoe_tiny_test.yaml", cfg / "vmoe_tiny_test.yaml")
    monkeypatch.setenv("ZOO_CONFIGS", str(tmp_path / "configs"))
    monkeypatch.setenv("ZOO_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _task_checkpoint(path: Path):
    """What Lightning writes for ImageClassificationTask: state_dict (model under ``model.``), hyper_parameters,
    plus the zoo's datamodule / trainer records."""
    from zoo.tasks.classification import ImageClassificationTask

    torch.manual_seed(0)
    task = ImageClassificationTask(model="vmoe_tiny_test", model_overrides={"encoder": {"dropout": 0.1}},
                                   eval_capacity_factor=2.0, lr=1e-3, label_smoothing=0.1)
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "epoch": 3,
            "global_step": 120, "pytorch-lightning_version": "2.x",
            "zoo_datamodule": {"class_path": "zoo.data.image_classification.DigitsDataModule",
                               "init_args": {"batch_size": 64, "seed": 0}},
            "zoo_trainer": {"precision": "32-true", "num_threads": 1}}
    torch.save(ckpt, path)
    return task


EVAL_JSON = {"checkpoint": "/x/last.ckpt", "split": "test", "datamodule": "zoo.data.DigitsDataModule",
             "model": "vmoe_tiny_test", "n_examples": 360, "accuracy": 0.5, "accuracy_top5": 0.9, "loss": 1.2,
             "eval_capacity_factor": 2.0, "plots": ["/x/a.png"],
             "layers": {"encoder.blocks.1.mlp": {"dropped_fraction": 0.01, "tokens_per_expert_share": [0.1, 0.2, 0.3, 0.4],
                                                 "tokens_per_expert": [1, 2, 3, 4], "capacity": 12}}}


def test_export_lightning_checkpoint(project):
    ckpt = project / "last.ckpt"
    task = _task_checkpoint(ckpt)
    (project / "metrics.json").write_text(json.dumps(EVAL_JSON))
    yaml_path = project / "configs/models/vmoe/vmoe_tiny_test.yaml"
    before = yaml_path.read_text()
    out = project / "weights" / "vmoe_tiny_test.synthetic"
    rc = publish.main(["export", "--checkpoint", str(ckpt), "--preset", "vmoe_tiny_test", "--tag", "synthetic",
                   "--out", str(out), "--metrics", str(project / "metrics.json")])
    assert rc == 0
    # manifest
    manifest = json.loads((project / "weights/manifest.json").read_text())
    (entry,) = manifest["weights"]
    assert (entry["name"], entry["tag"], entry["local_dir"]) == ("vmoe_tiny_test", "synthetic", out.name)
    assert entry["sha256"] == hub.sha256_file(out / "model.safetensors")
    assert entry["metrics"]["accuracy"] == 0.5 and "layers" not in entry["metrics"] and "plots" not in entry["metrics"]
    assert entry["overrides"] == {"encoder.dropout": 0.1, "encoder.moe.eval_capacity_factor": 2.0}
    assert entry["input"] == {"size": [3, 16, 16], "mean": [0.3053], "std": [0.376]}  # from the datamodule class
    assert entry["data"]["init_args"]["batch_size"] == 64 and entry["data"]["num_threads"] == 1
    # preset YAML: config text untouched, pretrained section added and marked default
    after = yaml_path.read_text()
    assert after.startswith(before)
    tag = yaml.safe_load(after)["pretrained"]["synthetic"]
    assert tag["default"] is True and tag["sha256"] == entry["sha256"]
    # loads back with the task's behaviour (eval capacity override included)
    model = zoo.create_model("vmoe_tiny_test", pretrained=True)
    assert model.config.encoder.moe.eval_capacity_factor == 2.0
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, task.model.eval()(x).logits, rtol=0, atol=0)
    card = (out / "README.md").read_text()
    assert "encoder.blocks.1.mlp" in card and "| accuracy | 0.5 |" in card and "label_smoothing" in card
    assert publish.verify_manifest() == []
    # exporting again replaces the entry; a second tag is not default
    publish.main(["export", "--checkpoint", str(ckpt), "--preset", "vmoe_tiny_test", "--tag", "synthetic2",
              "--out", str(project / "weights/vmoe_tiny_test.synthetic2"), "--dtype", "float16"])
    tags = yaml.safe_load(yaml_path.read_text())["pretrained"]
    assert tags["synthetic"]["default"] and not tags["synthetic2"]["default"]
    assert len(json.loads((project / "weights/manifest.json").read_text())["weights"]) == 2
    half = zoo.create_model("vmoe_tiny_test", pretrained="synthetic2")
    assert half.head.weight.dtype == torch.float32
    assert (out.parent / "vmoe_tiny_test.synthetic2/model.safetensors").stat().st_size < \
        0.6 * (out / "model.safetensors").stat().st_size


def test_export_rejects_wrong_preset(project):
    ckpt = project / "last.ckpt"
    _task_checkpoint(ckpt)
    with pytest.raises(ConfigError, match="trained with model 'vmoe_tiny_test', not --preset 'vmoe_tiny_digits'"):
        publish.export_checkpoint(ckpt, "vmoe_tiny_digits", "x", project / "weights/x", update_registry=False)
    with pytest.raises(hub.WeightsNotFoundError):
        publish.export_checkpoint(project / "nope.ckpt", "vmoe_tiny_test", "x", project / "weights/x")


def test_export_cli_help():
    proc = subprocess.run([sys.executable, "-m", "zoo.tasks.publish", "export", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--checkpoint" in proc.stdout and "--metrics" in proc.stdout
