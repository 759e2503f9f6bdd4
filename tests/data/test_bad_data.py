"""Issue 17 item 6: bad image data fails at setup, by name (single class, empty class folder, truncated image)."""

from __future__ import annotations

import pytest
from PIL import Image

from zoo.data import ImageFolderDataModule


def _tree(root, classes, n=6):
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (12, 12), (i * 30, 0, 0)).save(root / cls / f"{i}.jpg")
    return root


def test_a_single_class_folder_fails_at_setup(tmp_path):
    dm = ImageFolderDataModule(root=_tree(tmp_path, ["a"], n=20), image_size=8)
    with pytest.raises(ValueError, match="1 class folder.*at least 2"):
        dm.setup()


def test_an_empty_class_folder_is_named_at_setup(tmp_path):
    _tree(tmp_path, ["a", "b"])
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="class folder\\(s\\) c .* hold no images"):
        ImageFolderDataModule(root=tmp_path, image_size=8, val_size=2, test_size=2).setup()


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_image_is_named_or_skipped_and_counted(tmp_path):
    _tree(tmp_path, ["a", "b"])
    bad = tmp_path / "b" / "3.jpg"
    _truncate(bad)
    dm = ImageFolderDataModule(root=tmp_path, image_size=8, val_size=2, test_size=2, batch_size=12)
    dm.setup()
    with pytest.raises(ValueError, match=f"cannot read image {bad}"):
        for split in (dm.train_set, dm.val_set, dm.test_set):
            for i in range(len(split)):
                split[i]
    skipping = ImageFolderDataModule(root=tmp_path, image_size=8, val_size=2, test_size=2, skip_unreadable=True)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        skipping.setup()
    assert skipping.skipped_images == [str(bad)] and sum(skipping.split_sizes.values()) == 11


def test_more_loader_workers_than_cores_are_capped(monkeypatch, capsys):
    """A GPU recipe's 4 workers on a 2-core machine: capped to the cores (same batches, no oversubscription)."""
    import os

    from zoo.data.base import SplitDataModule

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert SplitDataModule(num_workers=4).num_workers == 2
    assert "num_workers=4 > 2 usable CPU cores" in capsys.readouterr().out
    assert SplitDataModule(num_workers=1).num_workers == 1
