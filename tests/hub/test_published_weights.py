"""The weights the project publishes (``weights/manifest.json``): every entry is consistent with its preset's
``pretrained:`` tag, loads with ``pretrained=True`` offline from ``weights/``, and reproduces its recorded test
accuracy (same datamodule, batch size and thread count as recorded)."""

from __future__ import annotations

import importlib
import inspect
import json

import pytest
import torch

import zoo
from zoo import hub
from zoo.config import merge, to_dict
from zoo.registry import model_config

MANIFEST = hub.read_manifest()
ENTRIES = MANIFEST["weights"]
IDS = [f"{w['name']}.{w['tag']}" for w in ENTRIES]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no download may happen
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("ZOO_WEIGHTS", raising=False)
    monkeypatch.delenv("ZOO_CONFIGS", raising=False)


def test_manifest_lists_the_digits_weights():
    assert "vmoe_tiny_digits.digits" in IDS


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_manifest_entry_matches_preset_and_files(entry):
    tags = hub.pretrained_tags(entry["name"])
    tag = tags[entry["tag"]]
    for key in ("hf_hub_id", "file", "sha256", "local_dir", "size"):
        assert tag[key] == entry[key], key
    folder = hub.weights_dir() / entry["local_dir"]
    weights = folder / entry["file"]
    assert hub.sha256_file(weights) == entry["sha256"]
    assert weights.stat().st_size == entry["size"]
    # config.json is exactly the preset's config (+ the tag's recorded overrides) plus the family
    config = json.loads((folder / "config.json").read_text())
    expected = to_dict(model_config(entry["name"], **merge({}, entry.get("overrides") or {})))
    assert config == {"family": hub.load_preset(entry["name"])["family"], **expected}
    assert (folder / "README.md").read_text().startswith("---\n")


def _datamodule(data: dict):
    module, _, name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in (data.get("init_args") or {}).items() if k in params})


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_pretrained_true_offline_reproduces_accuracy(entry, offline):
    model = zoo.create_model(entry["name"], pretrained=entry["tag"]).eval()
    assert model.pretrained_cfg["source"].startswith("local-dir:")
    metrics, data = entry.get("metrics") or {}, entry.get("data")
    if "accuracy" not in metrics or not data:
        pytest.skip("no recorded accuracy / datamodule")
    try:
        dm = _datamodule(data)
        dm.setup("test")
    except FileNotFoundError as err:
        pytest.skip(f"dataset not available here: {err}")
    threads = torch.get_num_threads()
    torch.set_num_threads(int(data.get("num_threads") or threads))
    try:
        correct = n = 0
        with torch.no_grad():
            for images, labels in dm.test_dataloader():
                correct += int((model(images).logits.argmax(-1) == labels).sum())
                n += len(labels)
    finally:
        torch.set_num_threads(threads)
    assert n == metrics.get("n_examples", n)
    # same batches, same thread count: the same predictions; allow one flipped example for other BLAS builds
    assert abs(correct / n - metrics["accuracy"]) <= 1.0 / n + 1e-9, (correct / n, metrics["accuracy"])


def test_default_tag_is_used_by_pretrained_true(offline):
    a = zoo.create_model("vmoe_tiny_digits", pretrained=True)
    b = zoo.create_model("vmoe_tiny_digits", pretrained="digits")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
