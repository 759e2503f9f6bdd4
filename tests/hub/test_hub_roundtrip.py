"""save_pretrained / push_to_hub / hf_hub_download / create_model round trips against the local test hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

import zoo
from zoo import hub
from zoo.config import to_dict
from zoo.registry import build_model, configs_dir


def _random_model(name: str = "vmoe_tiny_test", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = zoo.create_model(name, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _images(model, n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return torch.randn(n, c.in_chans, c.image_size, c.image_size, generator=g)


@torch.no_grad()
def _logits(model, x):
    return model.eval()(x).logits


def test_save_pretrained_writes_exact_preset_config(tmp_path):
    model = _random_model()
    out = hub.save_pretrained(model, tmp_path / "m", metrics={"test/acc": 0.5},
                              routing=[{"layer": "encoder.blocks.1.mlp", "expert_load": [0.25] * 4,
                                        "dropped_fraction": 0.0}],
                              recipe={"epochs": 3, "lr": 1e-3})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "pretrained.json"]
    config = json.loads((out / "config.json").read_text())
    preset = yaml.safe_load((configs_dir() / "models/vmoe/vmoe_tiny_test.yaml").read_text())
    assert config == {"family": "vmoe", **to_dict(model.config)}
    # exactly the preset's config: the preset's `config:` section builds an identical config.
    assert to_dict(zoo.model_config("vmoe_tiny_test")) == {k: v for k, v in config.items() if k != "family"}
    assert preset["family"] == config["family"]
    rebuilt = build_model(config.pop("family"), config)
    assert to_dict(rebuilt.config) == to_dict(model.config)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: moe-zoo")
    for text in ("vmoe_tiny_test", "test/acc", "Routing statistics", "encoder.blocks.1.mlp", "Training recipe"):
        assert text in card
    meta = json.loads((out / "pretrained.json").read_text())
    assert meta["preset"] == "vmoe_tiny_test" and meta["sha256"] == hub.sha256_file(out / "model.safetensors")


def test_local_dir_roundtrip_same_logits(tmp_path):
    model = _random_model()
    x = _images(model)
    hub.save_pretrained(model, tmp_path / "m")
    loaded = zoo.create_model(f"local-dir:{tmp_path / 'm'}")
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)
    # the same weights into the preset by name, and config only (pretrained=False) gives other logits
    into_preset = zoo.create_model("vmoe_tiny_test", pretrained=f"local-dir:{tmp_path / 'm'}")
    torch.testing.assert_close(_logits(into_preset, x), _logits(model, x), rtol=0, atol=0)
    fresh = zoo.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=False)
    assert not torch.equal(_logits(fresh, x), _logits(model, x))
    assert loaded.pretrained_cfg["source"].startswith("local-dir:")


def test_overrides_resize_pos_embed_and_reset_head(tmp_path):
    model = _random_model()
    hub.save_pretrained(model, tmp_path / "m")
    bigger = zoo.create_model(f"local-dir:{tmp_path / 'm'}", image_size=32)
    assert bigger.pos_embed.shape == (1, 1 + 64, 32)
    assert any("resized" in n for n in bigger.pretrained_cfg["notes"])
    five = zoo.create_model(f"local-dir:{tmp_path / 'm'}", num_classes=5)
    assert five.head.weight.shape == (5, 32)
    torch.testing.assert_close(five.encoder.norm.weight, model.encoder.norm.weight)


def test_push_download_roundtrip(fake_hub):
    model = _random_model(seed=3)
    x = _images(model)
    info = hub.push_to_hub(model, "zoo-test/tiny-roundtrip", metrics={"acc": 0.25})
    assert info.oid and info.commit_url.startswith(fake_hub.url)
    stored = fake_hub.repos["zoo-test/tiny-roundtrip"]
    files = stored["commits"][stored["refs"]["main"]]
    assert {"config.json", "model.safetensors", "README.md", "pretrained.json"} <= set(files)
    loaded = zoo.create_model("hf-hub:zoo-test/tiny-roundtrip")
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)
    assert loaded.pretrained_cfg["metrics"] == {"acc": 0.25}
    # downloads went through hf_hub_download (HEAD + GET on /resolve/) into the hub cache
    gets = [p for m, p in fake_hub.requests if m == "GET" and "/resolve/" in p]
    assert any(p.endswith("/model.safetensors") for p in gets)
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert list(cache.glob("models--zoo-test--tiny-roundtrip/snapshots/*/model.safetensors")), "not in the hub cache"
    # pushing again (new weights) makes a new commit; a pinned revision still gives the old weights
    old_sha = stored["refs"]["main"]
    model2 = _random_model(seed=4)
    hub.push_to_hub(model2, "zoo-test/tiny-roundtrip")
    torch.testing.assert_close(_logits(zoo.create_model("hf-hub:zoo-test/tiny-roundtrip"), x), _logits(model2, x))
    torch.testing.assert_close(_logits(zoo.create_model(f"hf-hub:zoo-test/tiny-roundtrip@{old_sha}"), x),
                               _logits(model, x))


def test_offline_uses_warm_cache_and_fails_cold(fake_hub, monkeypatch, tmp_path):
    model = _random_model(seed=5)
    x = _images(model)
    hub.push_to_hub(model, "zoo-test/tiny-offline")
    zoo.create_model("hf-hub:zoo-test/tiny-offline")  # warm the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(fake_hub.requests)
    loaded = zoo.create_model("hf-hub:zoo-test/tiny-offline")
    assert len(fake_hub.requests) == n, "offline mode must not talk to the server"
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cold"))
    with pytest.raises(hub.WeightsNotFoundError, match="HF_HUB_OFFLINE"):
        zoo.create_model("hf-hub:zoo-test/tiny-offline")
    assert len(fake_hub.requests) == n
    with pytest.raises(hub.PretrainedError, match="HF_HUB_OFFLINE"):
        hub.push_to_hub(model, "zoo-test/tiny-offline")


def test_hub_missing_files_and_repo(fake_hub):
    model = _random_model()
    cfg = json.dumps(hub.model_config_dict(model)).encode()
    fake_hub.put_files("zoo-test/no-weights", {"config.json": cfg})
    with pytest.raises(hub.WeightsNotFoundError, match="model.safetensors"):
        zoo.create_model("hf-hub:zoo-test/no-weights")
    with pytest.raises(hub.WeightsNotFoundError, match="not found"):
        zoo.create_model("hf-hub:zoo-test/does-not-exist")
    fake_hub.put_files("zoo-test/no-config", {"model.safetensors": b"x"})
    with pytest.raises(hub.WeightsNotFoundError, match="config.json"):
        zoo.create_model("hf-hub:zoo-test/no-config")


def test_hub_truncated_download_is_detected(fake_hub, tmp_path):
    model = _random_model()
    hub.save_pretrained(model, tmp_path / "m")
    files = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    fake_hub.put_files("zoo-test/truncated", files)
    fake_hub.truncate[("zoo-test/truncated", "model.safetensors")] = len(files["model.safetensors"]) // 2
    with pytest.raises(hub.CorruptCheckpointError, match="truncated"):
        zoo.create_model("hf-hub:zoo-test/truncated")
