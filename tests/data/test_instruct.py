"""LLaVA-JSON instruction datamodule: batch keys / shapes / dtypes, right padding, mixed image and text-only batches,
audio batches, max length, exact resume, the tokenizer kept in the datamodule state, image processing, bad input."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.data.instruct import ImageProcessor, InstructDataModule
from zoo.data.templates import AUDIO_TOKEN_ID, IGNORE_INDEX, IMAGE_TOKEN_ID, CompactTokenizer, ConversationError


def conv(*values):
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def write_png(path: Path, h: int, w: int, seed: int = 0) -> None:
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def write_wav(path: Path, samples: np.ndarray, rate: int = 8000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((samples * 32767).astype("<i2").tobytes())


@pytest.fixture()
def folder(tmp_path):
    write_png(tmp_path / "a.png", 20, 30, 0)
    write_png(tmp_path / "b.png", 24, 24, 1)
    write_wav(tmp_path / "s.wav", np.sin(np.arange(800) * 0.3) * 0.5)
    records = [
        {"id": "img-a", "image": "a.png", "conversations": conv("<image>\nWhat is it?", "A red square.")},
        {"id": "text", "conversations": conv("Say hello.", "Hello.", "Again?", "Hello again.")},
        {"id": "img-b", "image": ["b.png"], "conversations": conv("Describe <image> now.", "Noise.")},
        {"id": "text2", "conversations": conv("Count to two.", "One two.")},
        {"id": "img-a2", "image": "a.png", "conversations": conv("<image>\nColour?", "Red.")},
        {"id": "text3", "conversations": conv("Bye.", "Goodbye.")},
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    (tmp_path / "test.json").write_text(json.dumps(records[:2]))
    return tmp_path


def make(folder, records=None, name="train.json", **kw):
    if records is not None:
        (folder / name).write_text(json.dumps(records))
    kw.setdefault("image_size", 16)
    kw.setdefault("batch_size", 3)
    dm = InstructDataModule(train_json=folder / name, **kw)
    dm.setup()
    return dm


def test_batch_keys_shapes_dtypes_and_right_padding(folder):
    dm = make(folder, test_json=folder / "test.json")
    assert dm.split_sizes == {"train": 6, "val": 0, "test": 2}
    batch = dm.collate_fn([dm.train_set[i] for i in range(4)])
    B, L = batch["input_ids"].shape
    assert B == 4 and batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.bool and batch["images"].dtype == torch.float32
    assert batch["images"].shape == (4, 3, 16, 16) and "audio" not in batch and "video" not in batch
    lengths = [len(dm.train_set.input_ids[i]) for i in range(4)]
    assert L == max(lengths)
    for b, n in enumerate(lengths):  # right padding: real tokens first, then pad id / -100 / False
        assert batch["attention_mask"][b].tolist() == [True] * n + [False] * (L - n)
        assert (batch["input_ids"][b, n:] == dm.pad_token_id).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert torch.equal(batch["input_ids"][b, :n], dm.train_set.input_ids[b])
    # mixed batch: a placeholder exactly where there is an image; text-only samples get zeros and no placeholder
    has_placeholder = (batch["input_ids"] == IMAGE_TOKEN_ID).sum(1)
    has_image = batch["images"].flatten(1).abs().sum(1) > 0
    assert has_placeholder.tolist() == [1, 0, 1, 0] and has_image.tolist() == [True, False, True, False]
    assert (batch["labels"][batch["input_ids"] == IMAGE_TOKEN_ID] == IGNORE_INDEX).all()
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["task_index"].tolist() == [0, 0, 0, 0]
    # the answers are what is learned
    answer = dm.tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX])
    assert answer == "a red square ."


def test_audio_batches_are_16k_waveforms_with_lengths(folder):
    records = [{"id": "aud", "audio": "s.wav", "conversations": conv("<audio>\nWhich digit?", "7")},
               {"id": "txt", "conversations": conv("Hi.", "Hello.")}]
    dm = make(folder, records, "audio.json", batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    order = batch["index"].argsort()  # the train loader shuffles: put "aud" first
    batch = {k: v[order] for k, v in batch.items()}
    assert batch["audio"].dtype == torch.float32 and batch["audio"].shape == (2, 1600)  # 800 samples at 8 kHz
    assert batch["audio_lengths"].tolist() == [1600, 0]
    assert (batch["input_ids"] == AUDIO_TOKEN_ID).sum(1).tolist() == [1, 0]
    assert (batch["audio"][1] == 0).all() and batch["images"].abs().sum() == 0


def test_max_length_error_and_right_truncation(folder):
    long = [{"id": "long", "image": "a.png", "conversations": conv("<image>\nWhat?", "one two three four five six")}]
    with pytest.raises(ValueError, match="sample long is .* over max_length=8"):
        make(folder, long, "long.json", max_length=8)
    dm = make(folder, long, "long.json", max_length=9, truncation="right")
    assert len(dm.train_set.input_ids[0]) == 9 and (dm.train_set.labels[0] != IGNORE_INDEX).any()
    # tokens_per_image: the image counts as its spliced tokens; cutting it away is refused
    with pytest.raises(ValueError, match="would cut a media placeholder"):
        make(folder, [{"id": "late", "image": "a.png", "conversations": conv("a b c d e f <image>", "x")}],
             "late.json", max_length=8, truncation="right")
    with pytest.raises(ValueError, match="no answer token is left"):
        make(folder, long, "long.json", max_length=10, truncation="right", tokens_per_image=5)


@pytest.mark.parametrize("record,error,match", [
    ({"id": "m", "image": "missing.png", "conversations": conv("<image> q", "a")}, FileNotFoundError,
     "missing.png"),
    ({"id": "n", "conversations": conv("<image> q")}, ConversationError, "sample n: the conversation has no 'gpt'"),
    ({"id": "t", "image": "a.png", "conversations": conv("<image> <image> q", "a")}, ConversationError,
     "2 <image> tag\\(s\\) but 1 image"),
    ({"id": "u", "conversations": conv("<image> q", "a")}, ConversationError, "1 <image> tag\\(s\\) but 0 image"),
    ({"id": "v", "image": "a.png", "conversations": conv("q", "a")}, ConversationError, "no <image> tag"),
    ({"id": "w", "conversations": conv("<audio> q", "a")}, ConversationError, "<audio> tag"),
    ({"id": "x", "image": ["a.png", "b.png"], "conversations": conv("<image><image> q", "a")}, ValueError,
     "one image per sample"),
    ({"id": "y"}, ValueError, "needs a 'conversations' list"),
])
def test_bad_samples_are_named(folder, record, error, match):
    with pytest.raises(error, match=match):
        make(folder, [record], "bad.json")


def test_bad_files_and_arguments(folder):
    (folder / "notlist.json").write_text(json.dumps({"conversations": []}))
    with pytest.raises(ValueError, match="must hold a JSON list"):
        make(folder, None, "notlist.json")
    with pytest.raises(FileNotFoundError, match="instruction JSON not found"):
        make(folder, None, "absent.json")
    with pytest.raises(FileNotFoundError, match="image_folder not found"):
        InstructDataModule(folder / "train.json", image_folder=folder / "nope")
    with pytest.raises(ValueError, match="truncation must be"):
        InstructDataModule(folder / "train.json", truncation="left")
    with pytest.raises(ValueError, match="unknown conversation template"):
        InstructDataModule(folder / "train.json", template="llama9")


def _epoch(dm):
    return [b["input_ids"] for b in dm.train_dataloader()]


def test_exact_resume_from_the_state_position(folder):
    dm = make(folder, batch_size=2, seed=3)
    first, second = _epoch(dm), _epoch(dm)
    assert len(first) == 3 and not all(torch.equal(a, b) for a, b in zip(first, second))  # reshuffled per epoch
    resumed = InstructDataModule(folder / "train.json", image_size=16, batch_size=2, seed=3)
    resumed.load_state_dict({"train_order": {"epoch": 0, "batches_done": 1, "batch_size": 2, "epoch_finished": False,
                                             "seed": 3}})
    resumed.setup()
    rest = _epoch(resumed)
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, first[1:]))
    assert all(torch.equal(a, b) for a, b in zip(_epoch(resumed), second))


def test_tokenizer_is_kept_in_the_state_and_restored(folder):
    dm = make(folder)
    state = dm.state_dict()
    assert CompactTokenizer.from_state_dict(state["tokenizer"]) == dm.tokenizer
    other = [{"id": "o", "conversations": conv("Completely different words here.", "Indeed.")}]
    (folder / "other.json").write_text(json.dumps(other))
    before = InstructDataModule(folder / "other.json", image_size=16)  # restored before setup: used as is
    before.load_state_dict(state)
    before.setup()
    assert before.tokenizer == dm.tokenizer and before.vocab_size == dm.vocab_size
    after = make(folder, None, "other.json")  # restored after setup: every split is encoded again with it
    assert after.tokenizer != dm.tokenizer
    after.load_state_dict(state)
    assert after.tokenizer == dm.tokenizer
    assert CompactTokenizer.UNK in after.train_set.input_ids[0].tolist()  # "completely" is not in that vocabulary
    assert torch.equal(after.train_set.input_ids[0],
                       torch.tensor(after.template.encode(other[0]["conversations"], dm.tokenizer).input_ids))


def test_image_processor_pads_with_the_mean_colour_and_resizes():
    proc = ImageProcessor(size=8, mean=(0.5, 0.25, 0.75), std=(0.5, 0.5, 0.5), aspect="pad")
    wide = torch.full((3, 4, 8), 255, dtype=torch.uint8)  # white, wider than high
    out = proc(wide)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    fill = (torch.tensor([int(0.5 * 255), int(0.25 * 255), int(0.75 * 255)]) / 255 - torch.tensor([.5, .25, .75])) / .5
    assert torch.allclose(out[:, 0, 0], fill, atol=1e-6)  # top row: padding in the mean colour
    assert torch.allclose(out[:, 4, 4], (1 - torch.tensor([.5, .25, .75])) / .5, atol=1e-6)  # centre: white
    crop = ImageProcessor(size=8, aspect="crop")(wide)
    assert crop.shape == (3, 8, 8) and torch.allclose(crop[:, 0, 0], crop[:, 4, 4])  # no padding
    gray = ImageProcessor(size=28, mean=(0.5,) * 3, std=(0.5,) * 3)(torch.arange(784, dtype=torch.uint8).view(1, 28, 28))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    with pytest.raises(ValueError, match="aspect must be"):
        ImageProcessor(aspect="stretch")
    with pytest.raises(ValueError, match="C = 1 or 3"):
        proc(torch.zeros(2, 4, 4))


def test_vocabulary_tasks_give_a_one_modality_stage_the_vocabulary_of_the_mixture():
    """Uni-MoE stage 2 trains on one modality per run but must share the vocabulary of the stages that train on the
    whole mixture (their checkpoints load into one model): ``vocabulary_tasks`` builds it from all of them."""
    from tests.conftest import shared_dataset_dir
    from zoo.data.instruct_sets import InstructSetsDataModule

    shared_dataset_dir("mnist", "t10k-images-idx3-ubyte.gz")
    shared_dataset_dir("fsdd", "recordings/3_jackson_7.wav")
    kw = dict(num_train=12, num_val=2, num_test=2, image_size=16, batch_size=4)
    mixture = InstructSetsDataModule(tasks=["fsdd", "mnist"], **kw)
    speech_only = InstructSetsDataModule(tasks=["fsdd"], **kw)
    speech_shared = InstructSetsDataModule(tasks=["fsdd"], vocabulary_tasks=["fsdd", "mnist"], **kw)
    for dm in (mixture, speech_only, speech_shared):
        dm.setup("fit")
    assert speech_shared.tokenizer == mixture.tokenizer and speech_shared.vocab_size == mixture.vocab_size
    assert speech_only.vocab_size < mixture.vocab_size  # the MNIST questions' words are missing without it
    assert {s.task for s in speech_shared.train_set.samples} == {"fsdd"}  # trains on its own task only
    with pytest.raises(ValueError, match="include every task trained on"):
        InstructSetsDataModule(tasks=["fsdd", "mnist"], vocabulary_tasks=["fsdd"], **kw)
    with pytest.raises(ValueError, match="cannot be combined with a tokenizer object"):
        InstructSetsDataModule(tasks=["fsdd"], vocabulary_tasks=["fsdd"], tokenizer=mixture.tokenizer, **kw)
