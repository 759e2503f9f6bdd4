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


def test_flickr8k_split_800_200_by_image(shared_dataset):
    shared_dataset("flickr8k_1k_subset", "captions.txt")  # skips without the data (fails under CI=true)
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


# ------------------------------------------------------------------------- extra views (self-supervision)
def _write_flat_colour_dataset(root: Path, n_images: int = 8, captions_per_image=(1, 2, 3)) -> Path:
    """Image i is one flat colour (crops and flips of it are itself), distinct per image."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    lines = ["image,caption"]
    for i in range(n_images):
        colour = np.array([20 + 25 * i, 200 - 20 * i, (70 * i) % 256], dtype=np.uint8)
        Image.fromarray(np.broadcast_to(colour, (18, 22, 3)).copy()).save(root / "images" / f"im{i}.png")
        for j in range(captions_per_image[i % len(captions_per_image)]):
            lines.append(f"im{i}.png,\"photo {i} caption {j}\"")
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root / "captions.csv"


def _normalised(dm: ImageTextCSVDataModule, index: int) -> torch.Tensor:
    ds = dm.train_set.images  # the InMemoryImageDataset: stored uint8 pixels of every photo + normalisation
    return ds.images[index].float() * ds._scale + ds._shift


def test_second_image_view_is_the_same_photo_augmented_independently(tmp_path):
    # Flat-colour photos: crop + flip leave them unchanged, so with augmentation on the second view must still be
    # exactly its own photo (and no other), while the first view is untouched by the colour distortion.
    csv_path = _write_flat_colour_dataset(tmp_path / "flat")
    dm = ImageTextCSVDataModule(csv_path, image_size=8, batch_size=6, num_train=6, num_test=2, context_length=12,
                                augment=True, image_views=2)
    dm.setup()
    torch.manual_seed(0)
    b = next(iter(dm.train_dataloader()))
    assert b["image_view2"].shape == b["image"].shape == (6, 3, 8, 8)
    for view1, view2, idx in zip(b["image"], b["image_view2"], b["label"]):
        own = _normalised(dm, int(idx))
        torch.testing.assert_close(view2, own, atol=1e-5, rtol=0)
        torch.testing.assert_close(view1, own, atol=1e-5, rtol=0)
    # augment off, no colour: the two views are the same tensor values
    plain = ImageTextCSVDataModule(_write_csv_dataset(tmp_path / "noise"), image_size=8, batch_size=4, num_train=7,
                                   num_test=3, context_length=12, augment=False, image_views=2)
    plain.setup()
    b = next(iter(plain.train_dataloader()))
    assert torch.equal(b["image_view2"], b["image"])
    assert all(torch.equal(v, _normalised(plain, int(i))) for v, i in zip(b["image"], b["label"]))
    # augment on (noise photos): the second view is drawn independently, so it differs from the first
    aug = ImageTextCSVDataModule(tmp_path / "noise" / "captions.csv", image_size=8, batch_size=7, num_train=7,
                                 num_test=3, context_length=12, augment=True, image_views=2)
    aug.setup()
    torch.manual_seed(1)
    b = next(iter(aug.train_dataloader()))
    differs = [(not torch.equal(v1, v2)) for v1, v2 in zip(b["image"], b["image_view2"])]
    assert sum(differs) >= 5
    # colour distortion of the second view only: with augment off the first view is the photo, the second is not
    col = ImageTextCSVDataModule(csv_path, image_size=8, batch_size=6, num_train=6, num_test=2, context_length=12,
                                 augment=False, image_views=2, view_color_jitter=1.0)
    col.setup()
    torch.manual_seed(0)
    b = next(iter(col.train_dataloader()))
    assert all(torch.equal(v, _normalised(col, int(i))) for v, i in zip(b["image"], b["label"]))
    assert sum(not torch.equal(v1, v2) for v1, v2 in zip(b["image"], b["image_view2"])) >= 3


def test_second_caption_is_a_different_caption_of_the_same_photo(tmp_path):
    csv_path = _write_csv_dataset(tmp_path, n_images=9, captions_per_image=(1, 2, 3))
    dm = ImageTextCSVDataModule(csv_path, image_size=8, batch_size=7, num_train=7, num_test=2, context_length=12,
                                augment=False, text_views=2)
    dm.setup()
    ds = dm.train_set
    torch.manual_seed(0)
    seen_second: dict[int, set] = {}
    for _ in range(60):
        for b in dm.train_dataloader():
            for t1, t2, idx in zip(b["text"], b["text_view2"], b["label"]):
                i = int(idx)
                n = int(ds.num_captions[i])
                own = [tuple(r.tolist()) for r in ds.captions[i, :n]]
                a, c = tuple(t1.tolist()), tuple(t2.tolist())
                assert a in own and c in own
                assert (a != c) if n >= 2 else (a == c)
                seen_second.setdefault(i, set()).add((own.index(a), own.index(c)))
    # with three captions, every ordered pair of different captions turns up
    three = [i for i in seen_second if int(ds.num_captions[i]) == 3]
    assert three and all(len(seen_second[i]) == 6 for i in three)
    with pytest.raises(ValueError, match="train_all_captions"):
        ImageTextCSVDataModule(csv_path, text_views=2, train_all_captions=True)


def test_extra_views_leave_the_other_keys_and_eval_batches_unchanged(tmp_path):
    csv_path = _write_csv_dataset(tmp_path, n_images=10)
    kw = dict(image_size=8, batch_size=3, num_train=6, num_test=2, num_val=2, context_length=12, seed=3)
    base = ImageTextCSVDataModule(csv_path, augment=False, **kw)
    views = ImageTextCSVDataModule(csv_path, augment=False, image_views=2, **kw)
    both = ImageTextCSVDataModule(csv_path, augment=True, image_views=2, text_views=2, view_color_jitter=0.5, **kw)
    for dm in (base, views, both):
        dm.setup()
    for loader in ("val_dataloader", "test_dataloader"):
        for b0, b1, b2 in zip(getattr(base, loader)(), getattr(views, loader)(), getattr(both, loader)()):
            assert set(b0) == set(b1) == set(b2) == {"image", "text", "label", "num_captions"}
            assert all(torch.equal(b0[k], b1[k]) and torch.equal(b0[k], b2[k]) for k in b0)
    # augment off: a second image view draws no random numbers, so the training batches' own keys are unchanged
    torch.manual_seed(5)
    b0 = [b for b in base.train_dataloader()]
    torch.manual_seed(5)
    b1 = [b for b in views.train_dataloader()]
    for x, y in zip(b0, b1):
        assert set(y) == set(x) | {"image_view2"} and all(torch.equal(x[k], y[k]) for k in x)
    assert set(next(iter(both.train_dataloader()))) == {"image", "text", "label", "image_view2", "text_view2"}


def test_view_option_errors(tmp_path):
    csv_path = _write_csv_dataset(tmp_path, n_images=6)
    with pytest.raises(ValueError, match="image_views must be 1 or 2"):
        ImageTextCSVDataModule(csv_path, image_views=3)
    with pytest.raises(ValueError, match="text_views must be an integer"):
        ImageTextCSVDataModule(csv_path, text_views=0)
    with pytest.raises(ValueError, match="set image_views=2"):
        ImageTextCSVDataModule(csv_path, view_color_jitter=0.5)
    main = ImageTextCSVDataModule(csv_path, image_size=8, num_train=4, num_test=2, context_length=16, image_views=2)
    other = ImageTextCSVDataModule(csv_path, image_size=8, num_train=4, num_test=2, context_length=16)
    with pytest.raises(ValueError, match="extra training views"):
        MixedImageTextDataModule(main, [other])


def test_color_jitter_grayscale():
    from zoo.data.image_text import color_jitter_grayscale

    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 6, 5), generator=g, dtype=torch.uint8)
    torch.manual_seed(0)
    assert torch.equal(color_jitter_grayscale(0.0, p_jitter=1.0, p_gray=0.0)(img), img)  # factors all 1
    assert torch.equal(color_jitter_grayscale(1.0, p_jitter=0.0, p_gray=0.0)(img), img)  # never applied
    gray = color_jitter_grayscale(1.0, p_jitter=0.0, p_gray=1.0)(img)
    luma = (0.299 * img[0].float() + 0.587 * img[1].float() + 0.114 * img[2].float()).round()
    assert gray.dtype == torch.uint8 and all(torch.equal(gray[c].float(), luma) for c in range(3))
    jitter = color_jitter_grayscale(1.0, p_jitter=1.0, p_gray=0.0)
    outs = [jitter(img) for _ in range(5)]
    assert all(o.dtype == torch.uint8 and o.shape == img.shape for o in outs)
    assert all(not torch.equal(o, img) for o in outs) and not torch.equal(outs[0], outs[1])
    # brightness, contrast and saturation keep a grey image grey (equal channels), in [0, 1] for float input
    grey = torch.rand(1, 4, 4).expand(3, 4, 4)
    out = color_jitter_grayscale(1.0, p_jitter=1.0, p_gray=0.0, pixel_max=1.0)(grey)
    assert out.dtype == torch.float32 and torch.allclose(out[0], out[1]) and torch.allclose(out[1], out[2])
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="strength"):
        color_jitter_grayscale(-1.0)
