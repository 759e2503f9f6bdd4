"""Offline resolution of hub names to local folders (:func:`zoo.convert.hf_files.find_hf_folder`) and the lazy
weight reader (:func:`zoo.convert.hf_files.open_hf_weights`)."""

import os
import time

import pytest

from zoo.convert.hf_files import find_hf_folder


def test_folder_search_dir_and_newest_cache_snapshot(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    direct = tmp_path / "my_tower"
    direct.mkdir()
    assert find_hf_folder(direct) == direct
    local = tmp_path / "towers" / "clip-vit-large-patch14-336"
    local.mkdir(parents=True)
    assert find_hf_folder("openai/clip-vit-large-patch14-336", search_dirs=[tmp_path / "towers"]) == local
    snaps = tmp_path / "hf_home" / "hub" / "models--google--siglip-so400m-patch14-384" / "snapshots"
    old, new = snaps / "aaa", snaps / "bbb"
    old.mkdir(parents=True)
    new.mkdir()
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert find_hf_folder("google/siglip-so400m-patch14-384") == new
    with pytest.raises(FileNotFoundError, match="no local folder for 'org/absent'.*huggingface-cli download"):
        find_hf_folder("org/absent")


def test_lazy_weights_equal_eager_read_and_read_on_access(tmp_path):
    """open_hf_weights gives the tensors read_hf_weights gives (sharded safetensors, every dtype kept) without
    reading any data up front, and a fresh tensor per access (nothing cached: the caller decides what stays)."""
    import json

    import torch
    from safetensors.torch import save_file

    from zoo.convert.hf_files import HFCheckpointError, LazyWeights, main_dtype, open_hf_weights, read_hf_weights

    torch.manual_seed(0)
    shards = {"model-1.safetensors": {"a": torch.randn(3, 4).to(torch.bfloat16), "n": torch.arange(5),
                                      "e": torch.zeros(0, 2)},
              "model-2.safetensors": {"b": torch.randn(6, 7).to(torch.bfloat16), "c": torch.randn(2),
                                      "m": torch.tensor([True, False])}}
    for name, tensors in shards.items():
        save_file(tensors, str(tmp_path / name))
    weight_map = {t: name for name, tensors in shards.items() for t in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    eager, lazy = read_hf_weights(tmp_path), open_hf_weights(tmp_path)
    assert isinstance(lazy, LazyWeights) and sorted(lazy) == sorted(eager) and len(lazy) == 6
    for name, value in eager.items():
        got = lazy[name]
        assert got.dtype == value.dtype and torch.equal(got, value), name
        if got.numel():
            assert lazy[name].data_ptr() != got.data_ptr()  # read again, not cached
    assert main_dtype(lazy) == main_dtype(eager) == torch.bfloat16
    weight_map["absent"] = "model-1.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(HFCheckpointError, match="mixed versions"):
        open_hf_weights(tmp_path)
    # data is read when asked for: damage after opening shows up on access, named
    with open(tmp_path / "model-2.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 4)
    with pytest.raises(HFCheckpointError, match="ended inside tensor"):
        [lazy[n] for n in ("b", "c", "m")]
