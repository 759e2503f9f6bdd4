"""Preset tags (``pretrained=True`` / ``"tag"``) and every bad-input case: missing file, wrong sha256, truncated
or foreign checkpoint, config/weights mismatch. Each error must say what was expected and what was found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import zoo
from zoo import hub
from zoo.tasks import publish
from zoo.config import ConfigError
from zoo.registry import configs_dir


def _random_model(name: str = "vmoe_tiny_test", seed: int = 0):
    torch.manual_seed(seed)
    model = zoo.create_model(name).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A private configs/ (copy of two presets) and weights/ root, so tests may add pretrained tags."""
    cfg = tmp_path / "configs" / "models" / "vmoe"
    cfg.mkdir(parents=True)
    for name in ("vmoe_tiny_test", "vmoe_tiny_digits"):  # copies without their pretrained: sections
        text = (configs_dir() / "models" / "vmoe" / f"{name}.yaml").read_text()
        for key, start, end in reversed(publish._top_level_blocks(text)):
            if key == "pretrained":
                text = text[:start] + text[end:]
        (cfg / f"{name}.yaml").write_text(text)
    monkeypatch.setenv("ZOO_CONFIGS", str(tmp_path / "configs"))
    monkeypatch.setenv("ZOO_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no test here may touch the network
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


def _publish(project: Path, model, tag: str = "t1", **entry_overrides) -> dict:
    folder = project / "weights" / f"vmoe_tiny_test.{tag}"
    hub.save_pretrained(model, folder, tag=tag)
    entry = {"hf_hub_id": f"zoo-test/vmoe_tiny_test.{tag}", "file": "model.safetensors",
             "sha256": hub.sha256_file(folder / "model.safetensors"), "local_dir": folder.name,
             "license": "apache-2.0", "input": {"size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3},
             "metrics": {"test/acc": 0.1}, **entry_overrides}
    publish.write_preset_tag("vmoe_tiny_test", tag, entry)
    return entry


def test_pretrained_true_and_tag_load_from_weights_dir(project):
    model = _random_model()
    x = torch.randn(2, 3, 16, 16)
    text_before = (project / "configs/models/vmoe/vmoe_tiny_test.yaml").read_text()
    _publish(project, model, "t1")
    text_after = (project / "configs/models/vmoe/vmoe_tiny_test.yaml").read_text()
    assert text_after.startswith(text_before), "the config: section must stay byte for byte"
    for loaded in (zoo.create_model("vmoe_tiny_test", pretrained=True),
                   zoo.create_model("vmoe_tiny_test", pretrained="t1")):
        torch.testing.assert_close(loaded.eval()(x).logits, model(x).logits, rtol=0, atol=0)
        assert loaded.pretrained_cfg["tag"] == "t1" and loaded.pretrained_cfg["input"]["mean"] == [0.5] * 3
    # a second tag: the first stays default unless asked
    model2 = _random_model(seed=1)
    _publish(project, model2, "t2")
    tags = yaml.safe_load((project / "configs/models/vmoe/vmoe_tiny_test.yaml").read_text())["pretrained"]
    assert tags["t1"]["default"] is True and tags["t2"]["default"] is False
    torch.testing.assert_close(zoo.create_model("vmoe_tiny_test", pretrained="t2").eval()(x).logits,
                               model2(x).logits, rtol=0, atol=0)
    assert zoo.list_pretrained("vmoe_tiny_test") == ["vmoe_tiny_test.t1", "vmoe_tiny_test.t2"]


def test_unknown_tag_and_preset_without_weights(project):
    _publish(project, _random_model(), "digits_v1")
    with pytest.raises(ConfigError, match=r"no pretrained tag 'digits_v2'.*did you mean 'digits_v1'"):
        zoo.create_model("vmoe_tiny_test", pretrained="digits_v2")
    with pytest.raises(ConfigError, match="has no pretrained weights"):
        zoo.create_model("vmoe_tiny_digits", pretrained=True)
    with pytest.raises(ConfigError, match="pretrained must be"):
        zoo.create_model("vmoe_tiny_test", pretrained=3)


def test_missing_weights_file(project):
    _publish(project, _random_model(), "t1")
    (project / "weights/vmoe_tiny_test.t1/model.safetensors").unlink()
    # not in weights/, and offline with a cold hub cache: says where it looked
    with pytest.raises(hub.WeightsNotFoundError, match=r"vmoe_tiny_test.t1.*HF_HUB_OFFLINE.*model.safetensors"):
        zoo.create_model("vmoe_tiny_test", pretrained=True)
    with pytest.raises(hub.WeightsNotFoundError, match=r"expected 'model.safetensors' or 'pytorch_model.bin'; "
                                                        r"found \['README.md', 'config.json', 'pretrained.json'\]"):
        zoo.create_model(f"local-dir:{project / 'weights/vmoe_tiny_test.t1'}")
    with pytest.raises(hub.WeightsNotFoundError, match="does not exist"):
        zoo.create_model(f"local-dir:{project / 'nowhere'}")


def test_wrong_sha256(project):
    entry = _publish(project, _random_model(), "t1", sha256="0" * 64)
    with pytest.raises(hub.ChecksumError) as err:
        zoo.create_model("vmoe_tiny_test", pretrained=True)
    actual = hub.sha256_file(project / "weights" / entry["local_dir"] / "model.safetensors")
    assert "0" * 64 in str(err.value) and actual in str(err.value)


def test_truncated_checkpoint(project):
    _publish(project, _random_model(), "t1")
    path = project / "weights/vmoe_tiny_test.t1/model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    # the sha256 catches it first when one is recorded ...
    with pytest.raises(hub.ChecksumError):
        zoo.create_model("vmoe_tiny_test", pretrained=True)
    # ... and the size check says what was expected and found when none is
    with pytest.raises(hub.CorruptCheckpointError, match=rf"describes {len(data)} bytes, the file has "
                                                         rf"{len(data) - 1000} bytes"):
        hub.read_weights(path)
    path.write_bytes(data[:5])
    with pytest.raises(hub.CorruptCheckpointError, match="not a safetensors file"):
        hub.read_weights(path)
    path.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(hub.CorruptCheckpointError):
        hub.read_weights(path)
    bin_path = path.with_name("pytorch_model.bin")
    bin_path.write_bytes(b"garbage")
    with pytest.raises(hub.CorruptCheckpointError, match="torch checkpoint"):
        hub.read_weights(bin_path)


def test_foreign_checkpoint(project, tmp_path):
    folder = tmp_path / "foreign"
    folder.mkdir()
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hub.model_config_dict(_random_model())))
    with pytest.raises(hub.CheckpointMismatchError) as err:
        zoo.create_model(f"local-dir:{folder}")
    for text in ("does not look like a vmoe checkpoint", "missing (58, expected by the model)",
                 "unexpected (2, found in the checkpoint): ['conv1.weight', 'fc.weight']"):
        assert text in str(err.value)
    (folder / "config.json").write_text(json.dumps({"model_type": "resnet", "num_labels": 10}))
    with pytest.raises(hub.CheckpointMismatchError, match=r"must hold 'family'.*found \['model_type', 'num_labels'\]"):
        zoo.create_model(f"local-dir:{folder}")
    (folder / "config.json").write_text(json.dumps({"family": "resnet"}))
    with pytest.raises(ConfigError, match="unknown model family 'resnet'"):
        zoo.create_model(f"local-dir:{folder}")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(hub.CorruptCheckpointError, match="not valid JSON"):
        zoo.create_model(f"local-dir:{folder}")


def test_config_weights_mismatch(project, tmp_path):
    model = _random_model()
    hub.save_pretrained(model, tmp_path / "m")
    # weights of vmoe_tiny_test into vmoe_tiny_digits: every shape and the config differences are listed
    with pytest.raises(hub.CheckpointMismatchError) as err:
        zoo.create_model("vmoe_tiny_digits", pretrained=f"local-dir:{tmp_path / 'm'}")
    msg = str(err.value)
    assert "cls_token: expected [1, 1, 64] (model), found [1, 1, 32] (checkpoint)" in msg
    assert "57 tensor(s) have other shapes" in msg and "... and 45 more" in msg
    assert "encoder.dim: model 64, checkpoint 32" in msg
    # config.json edited so that it no longer matches the weights
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    cfg["encoder"]["mlp_dim"] = 48
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    with pytest.raises(hub.CheckpointMismatchError, match=r"experts.w1: expected \[4, 32, 48\] \(model\), "
                                                          r"found \[4, 32, 64\] \(checkpoint\)"):
        zoo.create_model(f"local-dir:{tmp_path / 'm'}")


def test_bad_sources():
    with pytest.raises(ConfigError, match="hf-hub:org/repo"):
        zoo.create_model("hf-hub:just-a-name")
    with pytest.raises(ConfigError, match="cannot be combined"):
        zoo.create_model("local-dir:/tmp", pretrained="digits")
