"""Offline resolution of hub names to local folders (:func:`zoo.convert.hf_files.find_hf_folder`)."""

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
