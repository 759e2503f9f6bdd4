"""The fast instruction-batch path (table-look-up normalisation, moving-digit clips painted pre-normalised,
batch tensors written once in shared memory / fresh pages) gives batches bit-identical (``torch.equal``) to the
original per-frame code, kept below as the reference (``_ref_*``: the code before the change, verbatim in effect)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from zoo.data.instruct import ImageProcessor, InstructCollator, InstructDataset, InstructSample
from zoo.data.templates import IGNORE_INDEX, MEDIA_KINDS, CompactTokenizer, get_template
from zoo.data.video import DIRECTIONS, MovingDigitClip, moving_digit_clip


# ------------------------------------------------------------------------------------------ reference (old path)
def _ref_process(proc: ImageProcessor, image) -> torch.Tensor:
    """The original ImageProcessor.__call__: float arithmetic per image (PIL path for other sizes)."""
    from PIL import Image

    if (isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] in (1, 3)
            and image.shape[1] == image.shape[2] == proc.size):
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255).round()
        pixels = image.to(torch.uint8).float().expand(3, -1, -1) / 255.0
        return (pixels - proc.mean) / proc.std
    img = proc.to_pil(image)
    w, h = img.size
    if proc.aspect == "pad" and w != h:
        side = max(w, h)
        square = Image.new("RGB", (side, side), proc.fill)
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img, w, h = square, side, side
    scale = proc.size / min(w, h)
    nw, nh = max(proc.size, int(w * scale)), max(proc.size, int(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - proc.size) // 2, (nh - proc.size) // 2
    img = img.crop((left, top, left + proc.size, top + proc.size))
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (pixels - proc.mean) / proc.std


def _ref_item(ds: InstructDataset, i: int) -> dict:
    s = ds.samples[i]
    item = {"input_ids": ds.input_ids[i], "labels": ds.labels[i], "index": i, "task_index": ds._task_of[s.task]}
    for kind in MEDIA_KINDS:
        if not (ds.has[kind] or kind == "image"):
            continue
        source = s.media(kind)
        if callable(source) and not isinstance(source, torch.Tensor):
            source = source()
        if source is None:
            item[kind] = None
        elif kind == "image":
            item[kind] = _ref_process(ds.image_processor, source)
        elif kind == "audio":
            item[kind] = ds.load("audio", i)  # unchanged code
        else:
            item[kind] = torch.stack([_ref_process(ds.image_processor, frame) for frame in source])
    return item


def _ref_collate(items: list, pad: int, size: int) -> dict:
    B, L = len(items), max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((B, L), pad, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.bool)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = it["input_ids"], it["labels"], True
    images = torch.zeros(B, 3, size, size)
    for b, it in enumerate(items):
        if it["image"] is not None:
            images[b] = it["image"]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "images": images,
             "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
             "task_index": torch.tensor([int(it["task_index"]) for it in items], dtype=torch.long)}
    if "audio" in items[0]:
        lengths = torch.tensor([0 if it["audio"] is None else len(it["audio"]) for it in items], dtype=torch.long)
        audio = torch.zeros(B, max(1, int(lengths.max())))
        for b, it in enumerate(items):
            if it["audio"] is not None:
                audio[b, :lengths[b]] = it["audio"]
        batch["audio"], batch["audio_lengths"] = audio, lengths
    if "video" in items[0]:
        clips = [it["video"] for it in items if it["video"] is not None]
        shape = clips[0].shape if clips else (1, 3, size, size)
        video = torch.zeros(B, *shape)
        for b, it in enumerate(items):
            if it["video"] is not None:
                video[b] = it["video"]
        batch["video"] = video
    return batch


def _assert_same(batch: dict, ref: dict) -> None:
    assert batch.keys() == ref.keys()
    for k in ref:
        assert batch[k].dtype == ref[k].dtype and batch[k].shape == ref[k].shape, k
        assert torch.equal(batch[k], ref[k]), k


# ------------------------------------------------------------------------------------------------------- tests
def test_lut_normalisation_is_bit_identical_to_the_float_formula():
    proc = ImageProcessor(32, mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.7))
    g = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8, generator=g)
    rgb = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
    small = torch.randint(0, 256, (1, 20, 20), dtype=torch.uint8, generator=g)  # PIL resize path
    wide = torch.rand(3, 20, 40, generator=g)  # float, padded
    for image in (gray, rgb, small, wide, torch.arange(256, dtype=torch.uint8).view(1, 16, 16).repeat(1, 2, 2)):
        assert torch.equal(proc(image), _ref_process(proc, image))
    every = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(1, 3, 2, 2)
    assert torch.equal(proc.normalise_uint8(every)[0], _ref_process(proc, every[0]))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_painted_clip_equals_rendered_then_processed(direction):
    digits = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    proc = ImageProcessor(40)
    for seed in range(5):
        clip = MovingDigitClip(digits, 2, direction, frames=5, canvas=40, seed=seed)
        ref = torch.stack([_ref_process(proc, f) for f in moving_digit_clip(digits[2], direction, 5, 40, seed)])
        assert torch.equal(clip.normalised(proc), ref)
    assert MovingDigitClip(digits, 0, direction, 5, 40).normalised(ImageProcessor(32)) is None  # other size


def _synthetic_dataset(n: int = 30, size: int = 64) -> InstructDataset:
    g = torch.Generator().manual_seed(2)
    digits = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8, generator=g)
    samples = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            samples.append(InstructSample(f"v{i}", [{"from": "human", "value": "<video>\nwhere?"},
                                                     {"from": "gpt", "value": DIRECTIONS[i % 4]}], task="video",
                                          video=MovingDigitClip(digits, i % 10, DIRECTIONS[i % 4], 8, size, i)))
        elif kind == 1:
            samples.append(InstructSample(f"i{i}", [{"from": "human", "value": "<image>\nwhat digit?"},
                                                     {"from": "gpt", "value": str(i % 10)}], task="image",
                                          image=digits[i % 10]))
        elif kind == 2:
            samples.append(InstructSample(f"r{i}", [{"from": "human", "value": "<video>\nwhat digit?"},
                                                     {"from": "gpt", "value": "3"}], task="raw",
                                          video=torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8,
                                                              generator=g)))
        else:
            samples.append(InstructSample(f"t{i}", [{"from": "human", "value": "say yes"},
                                                     {"from": "gpt", "value": "yes"}], task="text"))
    template = get_template("tiny")
    tok = CompactTokenizer.build(t for s in samples for t in template.texts(s.conversations, s.id))
    return InstructDataset(samples, template, tok, ImageProcessor(size), max_length=200,
                           media_tokens={"image": 4, "audio": 1, "video": 4})


@pytest.mark.parametrize("num_workers", [0, 1])
def test_synthetic_batches_match_the_reference_in_process_and_in_a_worker(num_workers):
    ds = _synthetic_dataset()
    collate = InstructCollator(ds.tokenizer.pad_token_id, 64)
    loader = DataLoader(ds, batch_size=15, num_workers=num_workers, collate_fn=collate)  # 15 clips: 7.5 MB
    for batch in loader:
        idx = batch["index"].tolist()
        _assert_same(batch, _ref_collate([_ref_item(ds, i) for i in idx], ds.tokenizer.pad_token_id, 64))
    big = collate([ds[i] for i in range(len(ds))] * 2)  # >= 8 MB video: the huge-page mapping
    _assert_same(big, _ref_collate([_ref_item(ds, i) for i in range(len(ds))] * 2, ds.tokenizer.pad_token_id, 64))
    assert batch["video"].is_contiguous() and batch["images"].is_contiguous()


def test_uni_moe_stage1_mixture_batches_match_the_reference(shared_dataset):
    shared_dataset("mnist", "train-images-idx3-ubyte.gz")
    shared_dataset("fsdd", "README.md")
    from zoo.data.instruct_sets import InstructSetsDataModule

    dm = InstructSetsDataModule(tasks=["fsdd", "mnist", "video", "crossmodal"], num_train=300, num_val=20,
                                num_test=20, image_size=64, tokens_per_image=64, tokens_per_audio=8,
                                tokens_per_video=64, max_length=160, batch_size=48, num_workers=0, seed=0)
    dm.setup("fit")
    ds = dm.train_set
    seen = set()
    for n, batch in zip(range(3), dm.train_dataloader()):
        idx = batch["index"].tolist()
        seen |= {ds.samples[i].task for i in idx}
        _assert_same(batch, _ref_collate([_ref_item(ds, i) for i in idx], dm.pad_token_id, 64))
    assert {"fsdd", "mnist", "video_digit", "crossmodal"} <= seen
