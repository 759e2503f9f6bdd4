"""Weights are verified on load through ``local-dir:`` and ``hf-hub:`` too (the sha256 ``pretrained.json`` records),
once per file and process, with ``ZOO_SKIP_SHA256=1`` to skip; ``list_pretrained()`` names load by name."""

from __future__ import annotations

import shutil

import pytest
import torch

import zoo
from zoo import hub
from zoo.registry import weights_dir

DIGITS = "vmoe_tiny_digits.digits"


def _flipped_copy(tmp_path):
    """A copy of the published digits weights with 8 bytes flipped inside the tensor data (the header stays valid,
    so only the sha256 can tell)."""
    folder = tmp_path / DIGITS
    shutil.copytree(weights_dir() / DIGITS, folder)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    for i in range(8):
        data[len(data) - 1000 - 97 * i] ^= 0xFF
    path.write_bytes(bytes(data))
    return folder


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv(hub.SKIP_SHA256_ENV, raising=False)


def test_local_dir_flipped_bytes_are_refused(tmp_path, offline, monkeypatch):
    folder = _flipped_copy(tmp_path)
    expected = zoo.registry.pretrained_tags("vmoe_tiny_digits")["digits"]["sha256"]
    found = hub.sha256_file(folder / "model.safetensors")
    for load in (lambda: zoo.create_model(f"local-dir:{folder}"),
                 lambda: zoo.create_model("vmoe_tiny_digits", pretrained=f"local-dir:{folder}")):
        with pytest.raises(hub.ChecksumError) as err:
            load()
        msg = str(err.value)
        assert str(folder / "model.safetensors") in msg and expected in msg and found in msg
    monkeypatch.setenv(hub.SKIP_SHA256_ENV, "1")  # trusted: loads (the damaged weights) without hashing
    zoo.create_model(f"local-dir:{folder}")


def test_hf_hub_flipped_bytes_are_refused(fake_hub, tmp_path):
    folder = _flipped_copy(tmp_path)
    fake_hub.put_files("zoo-test/flipped", {p.name: p.read_bytes() for p in folder.iterdir()})
    with pytest.raises(hub.ChecksumError, match="pretrained.json"):
        zoo.create_model("hf-hub:zoo-test/flipped")


def test_each_file_is_hashed_once_per_process(tmp_path, offline, monkeypatch):
    folder = tmp_path / DIGITS
    shutil.copytree(weights_dir() / DIGITS, folder)
    calls = []
    real = hub.sha256_file
    monkeypatch.setattr(hub, "sha256_file", lambda p: calls.append(p) or real(p))
    a = zoo.create_model(f"local-dir:{folder}")
    b = zoo.create_model(f"local-dir:{folder}")
    assert len(calls) == 1
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    # a file changed in place is hashed again (and refused)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(hub.ChecksumError):
        zoo.create_model(f"local-dir:{folder}")
    assert len(calls) == 2


def test_list_pretrained_names_are_model_names(offline):
    names = zoo.list_pretrained()
    assert DIGITS in names
    for name in names:
        preset, tag = name.rsplit(".", 1)
        model = zoo.create_model(name, pretrained=True)
        assert (model.pretrained_cfg["preset"], model.pretrained_cfg["tag"]) == (preset, tag)
    a, b = zoo.create_model(DIGITS, pretrained=True), zoo.create_model("vmoe_tiny_digits", pretrained="digits")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for plain in (zoo.create_model(DIGITS), zoo.create_model(DIGITS, pretrained=False)):  # timm: no weights
        assert not hasattr(plain, "pretrained_cfg") and plain.config == a.config
    with pytest.raises(zoo.ConfigError, match="contradicts"):
        zoo.create_model(DIGITS, pretrained="other")
    with pytest.raises(zoo.ConfigError, match="no pretrained tag 'digitz'"):
        zoo.create_model("vmoe_tiny_digits.digitz")


def test_task_and_eval_accept_name_tag(offline):
    """``eval.py --model NAME.TAG --pretrained`` builds its model through the same parser (the task's create_model)."""
    from zoo.tasks.classification import ImageClassificationTask

    task = ImageClassificationTask(model=DIGITS, pretrained=True)
    assert (task.model.pretrained_cfg["preset"], task.model.pretrained_cfg["tag"]) == ("vmoe_tiny_digits", "digits")
