"""Image-text datamodules: templates, tokenizer, class captions, CSV / Flickr8k splits and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.data.image_text import (
    CIFAR10_HELDOUT_TEMPLATES,
    CIFAR10_TRAIN_TEMPLATES,
    MNIST_HELDOUT_TEMPLATES,
    MNIST_TRAIN_TEMPLATES,
    CaptionTokenizer,
    ClassCaptionDataModule,
    Flickr8kDataModule,
    ImageTextCSVDataModule,
    MixedImageTextDataModule,
    check_templates,
    read_caption_csv,
)
from zoo.data.paths import resolve_data_dir

FLICKR = resolve_data_dir() / "flickr8k_1k_subset"


def test_default_templates_are_disjoint_and_valid():
    check_templates(MNIST_TRAIN_TEMPLATES, MNIST_HELDOUT_TEMPLATES)
    check_templates(CIFAR10_TRAIN_TEMPLATES, CIFAR10_HELDOUT_TEMPLATES)
    with pytest.raises(ValueError, match="not be seen in training"):
        check_templates(["a photo of a {}."], ["A  photo of a {}.", "a {}"])
    with pytest.raises(ValueError, match="exactly one"):
        check_templates(["a {} {}"], ["b {}"])
    with pytest.raises(ValueError, match="empty"):
        check_templates(["a {}"], [])


def test_tokenizer_open_clip_offline():
    tok = CaptionTokenizer(8)
    t = tok(["a cat!", "one two three four five six seven eight nine"])
    assert t.shape == (2, 8) and t.dtype == torch.long
    assert t[0, 0] == 49406 and t[1, -1] == 49407  # start token; end token kept when truncating
    mask = tok.mask(t)
    n = int(mask[0].sum())
    assert t[0, n - 1] == 49407 and (t[0, n:] == 0).all() and mask[1].all()


def test_class_captions_use_train_templates_for_training_and_heldout_for_eval():
    dm = ClassCaptionDataModule("digits", batch_size=16, seed=0)
    assert dm.class_names[3] == "three" and dm.image_size == 8 and dm.in_chans == 1
    dm.setup()
    tok = dm.tokenizer
    train_captions = {tuple(r.tolist()) for r in tok([t.format(c) for c in dm.class_names for t in dm.train_templates])}
    heldout = {tuple(r.tolist()) for r in tok([t.format(c) for c in dm.class_names for t in dm.zero_shot_templates])}
    assert not train_captions & heldout
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 1, 8, 8) and batch["text"].shape == (16, 16)
    for row, label in zip(batch["text"], batch["label"]):
        assert tuple(row.tolist()) in train_captions
        assert tuple(row.tolist()) in {tuple(r.tolist()) for r in dm.train_set.table[label]}  # its own class
    val = next(iter(dm.val_dataloader()))
    assert all(tuple(r.tolist()) in heldout for r in val["text"])
    with pytest.raises(ValueError, match="dataset must be one of"):
        ClassCaptionDataModule("imagenet")
    with pytest.raises(ValueError, match="class_names"):
        ClassCaptionDataModule("digits", class_names=["a", "b"])
    with pytest.raises(ValueError, match="not be seen"):
        ClassCaptionDataModule("digits", zero_shot_templates=["the digit {}."])


def _write_csv_dataset(root: Path, n_images: int = 10, captions_per_image=(1, 2, 3)) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    lines = ["image,caption"]
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        for j in range(captions_per_image[i % len(captions_per_image)]):
            lines.append(f"im{i}.png,\"picture {i}, caption {j}\"")
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root / "captions.csv"


def test_csv_datamodule_splits_by_image(tmp_path):
    csv_path = _write_csv_dataset(tmp_path)
    dm = ImageTextCSVDataModule(csv_path, image_size=16, batch_size=4, num_train=7, num_test=3, seed=1,
                                context_length=12)
    dm.setup()
    tr, te = dm.split_indices["train"], dm.split_indices["test"]
    assert len(tr) == 7 and len(te) == 3 and not set(tr) & set(te)
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (4, 3, 16, 16) and b["text"].shape == (4, 12)
    e = next(iter(dm.test_dataloader()))
    assert e["text"].shape == (3, 3, 12)
    for row, n, idx in zip(e["text"], e["num_captions"], e["label"]):
        assert int(n) == (1, 2, 3)[int(idx) % 3]
        assert (row[int(n):] == 0).all() and (row[: int(n), 0] == 49406).all()
    again = ImageTextCSVDataModule(csv_path, image_size=16, num_train=7, num_test=3, seed=1)
    again.setup()
    assert np.array_equal(again.split_indices["test"], te)
    other = ImageTextCSVDataModule(csv_path, image_size=16, num_train=7, num_test=3, seed=2)
    other.setup()
    assert not np.array_equal(other.split_indices["test"], te)


def test_csv_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="caption CSV not found"):
        ImageTextCSVDataModule(tmp_path / "nope.csv").setup()
    bad = tmp_path / "bad.csv"
    bad.write_text("file,text\na.png,hello\n")
    with pytest.raises(ValueError, match="'image' and 'caption'"):
        read_caption_csv(bad)
    csv_path = _write_csv_dataset(tmp_path / "d", n_images=4)
    (tmp_path / "d" / "images" / "im2.png").unlink()
    with pytest.raises(FileNotFoundError, match="missing under"):
        ImageTextCSVDataModule(csv_path, num_train=2, num_test=2).setup()
    csv_path = _write_csv_dataset(tmp_path / "e", n_images=4)
    with pytest.raises(ValueError, match="do not fit"):
        ImageTextCSVDataModule(csv_path, num_train=4, num_test=2).setup()
    with pytest.raises(FileNotFoundError, match="flickr8k_1k_subset"):
        Flickr8kDataModule(data_dir=tmp_path / "empty").setup()


@pytest.mark.skipif(not (FLICKR / "captions.txt").is_file(), reason=f"Flickr8k subset not found at {FLICKR}")
def test_flickr8k_split_800_200_by_image():
    dm = Flickr8kDataModule(image_size=8, batch_size=50, seed=0, augment=False)
    dm.setup()
    tr, te = dm.split_indices["train"], dm.split_indices["test"]
    assert (len(tr), len(te)) == (800, 200) and not set(tr) & set(te)
    assert len(dm.image_names) == 1000
    b = next(iter(dm.test_dataloader()))
    assert b["text"].shape == (50, 5, 32) and (b["num_captions"] == 5).all()


def test_cifar10_class_captions_config():
    dm = ClassCaptionDataModule("cifar10_sprites", batch_size=8)
    assert dm.class_names[0] == "airplane" and dm.image_size == 32 and dm.in_chans == 3
    assert dm.train_templates == CIFAR10_TRAIN_TEMPLATES and dm.zero_shot_templates == CIFAR10_HELDOUT_TEMPLATES


def test_mixed_datamodule_trains_on_all_sources_and_evaluates_on_main(tmp_path):
    main = ClassCaptionDataModule("digits", batch_size=8, seed=0)
    extra = ClassCaptionDataModule("digits", batch_size=8, seed=5, train_templates=["a small {}."])
    dm = MixedImageTextDataModule(main, [extra], main_repeats=3, batch_size=32, seed=1)
    assert (dm.image_size, dm.in_chans, dm.context_length) == (8, 1, 16)
    assert dm.class_names == main.class_names and dm.zero_shot_templates == main.zero_shot_templates
    dm.setup()
    main.setup()
    extra.setup()
    n_main, n_extra = len(main.train_set), len(extra.train_set)
    assert dm.split_sizes == {"train": 3 * n_main + n_extra, "val": len(main.val_set), "test": len(main.test_set)}
    # main's items keep their labels; the extra source's are shifted into their own range, same images / texts.
    torch.manual_seed(0)
    first_extra = dm.train_set[3 * n_main]
    torch.manual_seed(0)
    own = extra.train_set[0]
    assert int(first_extra["label"]) == int(own["label"]) + MixedImageTextDataModule.LABEL_STRIDE
    assert torch.equal(first_extra["image"], own["image"]) and torch.equal(first_extra["text"], own["text"])
    assert int(dm.train_set[0]["label"]) == int(main.train_set[0]["label"])
    extra_captions = {tuple(r.tolist()) for r in extra.train_set.table.flatten(0, 1)}
    assert all(tuple(dm.train_set[3 * n_main + i]["text"].tolist()) in extra_captions for i in range(20))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (32, 1, 8, 8) and batch["text"].shape == (32, 16)
    assert torch.equal(next(iter(dm.test_dataloader()))["label"][:8], next(iter(main.test_dataloader()))["label"])
    # Sources that cannot share batches are refused with the fix in the message.
    with pytest.raises(ValueError, match=r"extra\[0\].*image_size, in_chans, context_length"):
        MixedImageTextDataModule(main, [ClassCaptionDataModule("digits", context_length=12)])
    csv_path = _write_csv_dataset(tmp_path, n_images=6)
    all_caps = ImageTextCSVDataModule(csv_path, image_size=8, num_train=4, num_test=2, context_length=16,
                                      train_all_captions=True)
    with pytest.raises(ValueError, match="train_all_captions"):
        MixedImageTextDataModule(all_caps, [ImageTextCSVDataModule(csv_path, image_size=8, num_train=4, num_test=2,
                                                                    context_length=16)])
