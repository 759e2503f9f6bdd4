"""Instruction sets built from the real data (zoo/data/instruct_sets.py): Flickr8k captions split by photo, MNIST /
CIFAR-10 class questions answered with the true labels, POPE-style yes/no balanced with every "no" naming a class
the image does not show, held-out question templates at val / test time, FSDD spoken digits and crossmodal pairs,
moving-digit videos, and the same sets for the same seed.

Ground truth comes from the raw files, not from the code under test: MNIST labels from the idx files (each sample's
image looked up by its pixels), FSDD digits and official split indices from the wav file names, Flickr8k captions
from captions.txt. Each test builds small subsets; without ../shared/data they skip (fail under ``CI=true``).
"""

from __future__ import annotations

import csv
import gzip
import re
import wave
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from zoo.data.instruct_sets import QUESTIONS, SPLITS, InstructSetsDataModule, build_task, flickr8k_captions

MNIST = ("mnist", "t10k-images-idx3-ubyte.gz")
FSDD = ("fsdd", "recordings/3_jackson_7.wav")
CIFAR = ("cifar10_convnetjs_subset", "cifar10_labels.js")
FLICKR = ("flickr8k_1k_subset", "captions.txt")
CAPS = dict(num_train=40, num_val=8, num_test=24)


def _idx(path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


@pytest.fixture(scope="module")
def mnist_truth(shared_dataset):
    """``{"train" | "test": {image bytes: label}}`` from the raw idx files (MNIST's val comes from its train file)."""
    root = shared_dataset(*MNIST)
    out = {}
    for kind, prefix in (("train", "train"), ("test", "t10k")):
        images = _idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28 * 28)
        labels = _idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8)
        out[kind] = {img.tobytes(): int(lab) for img, lab in zip(images, labels)}
    return out


def _true_digit(mnist_truth, split: str, image: torch.Tensor) -> int:
    table = mnist_truth["test" if split == "test" else "train"]
    key = image.to(torch.uint8).reshape(-1).numpy().tobytes()
    assert key in table, f"a {split} image is not an image of MNIST's {split} file"
    return table[key]


def _question(sample) -> str:
    """The human turn without its media tags."""
    return re.sub(r"<(image|audio|video)>\n?", "", sample.conversations[0]["value"]).strip()


def _answer(sample) -> str:
    return sample.conversations[1]["value"]


# ------------------------------------------------------------------------------------------------ templates
def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{\}", "an? .+") + "$", re.IGNORECASE)


TASK_CASES = {  # task -> (datasets it reads, builder options, question-template keys of its samples)
    "mnist": ((MNIST,), {}, ("mnist",)),
    "cifar10": ((CIFAR,), {}, ("cifar10",)),
    "pope": ((CIFAR,), {}, ("pope",)),
    "flickr8k_captions": ((FLICKR,), {}, ("flickr8k_captions",)),
    "fsdd": ((FSDD,), {}, ("fsdd",)),
    "video": ((MNIST,), {"frames": 4, "canvas": 32}, ("video_digit", "video_direction")),
    "crossmodal": ((MNIST, FSDD), {}, ("crossmodal",)),
}


@pytest.mark.parametrize("task", sorted(TASK_CASES))
def test_val_and_test_questions_are_templates_never_used_in_training(task, shared_dataset):
    datasets, options, keys = TASK_CASES[task]
    for d in datasets:
        shared_dataset(*d)
    splits = build_task(task, seed=0, **CAPS, **options)
    for split in SPLITS:
        assert splits[split], f"{task} {split} is empty"
        for s in splits[split]:
            train_t, heldout_t = QUESTIONS[s.task]
            assert s.task in keys
            q = _question(s)
            in_train = any(_template_regex(t).match(q) for t in train_t)
            in_heldout = any(_template_regex(t).match(q) for t in heldout_t)
            assert (in_train, in_heldout) == ((True, False) if split == "train" else (False, True)), (split, q)
    train_prompts = {" ".join(_question(s).lower().split()) for s in splits["train"]}
    for split in ("val", "test"):
        assert not train_prompts & {" ".join(_question(s).lower().split()) for s in splits[split]}
    # the held-out questions are really used (a test asking only one question would test little)
    used = Counter(re.sub(r"an? .+ in", "{} in", _question(s)) for s in splits["test"] if s.task == keys[0])
    assert len(used) >= 2, used


# ------------------------------------------------------------------------------------------------- images
def test_mnist_answers_are_the_true_labels(mnist_truth):
    splits = build_task("mnist", seed=0, num_train=200, num_val=50, num_test=200)
    for split in SPLITS:
        answers = [_answer(s) for s in splits[split]]
        truth = [str(_true_digit(mnist_truth, split, s.image)) for s in splits[split]]
        assert answers == truth, split
        assert len(set(answers)) >= (10 if len(answers) >= 200 else 5)  # many digits: not about one class
    ids = {split: {s.id for s in splits[split]} for split in SPLITS}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"])


def _asked_class(question: str) -> str:
    """The class a POPE question names, read back through its template ("Does the image contain a cat?" -> cat)."""
    for t in QUESTIONS["pope"][0] + QUESTIONS["pope"][1]:
        m = re.fullmatch(re.escape(t).replace(r"\{\}", "an? (.+)"), question)
        if m:
            return m.group(1)
    raise AssertionError(f"{question!r} matches no POPE template")


def _mnist_pope_truth(samples, mnist_truth, split):
    """(true digit, asked digit, answer) per POPE sample on MNIST ("Is there a 7 in the image?")."""
    out = []
    for s in samples:
        asked = _asked_class(_question(s))
        out.append((_true_digit(mnist_truth, split, s.image), int(asked), _answer(s)))
    return out


def test_pope_is_balanced_and_no_questions_name_an_absent_class(mnist_truth):
    splits = build_task("pope", seed=0, num_train=150, num_val=20, num_test=100, source="mnist")
    for split in SPLITS:
        rows = _mnist_pope_truth(splits[split], mnist_truth, split)
        answers = Counter(a for _, _, a in rows)
        assert set(answers) == {"yes", "no"} and answers["yes"] == answers["no"]  # yes-ratio exactly 0.5
        for true, asked, answer in rows:
            assert (answer == "yes") == (asked == true), (split, true, asked, answer)
        # each image is asked once about its class and once about another
        per_image = defaultdict(list)
        for s in splits[split]:
            per_image[s.id.rsplit("-", 1)[0]].append(_answer(s))
        assert all(sorted(v) == ["no", "yes"] for v in per_image.values())
    # the absent class is drawn over the other classes, not a fixed shift of the true one
    train = _mnist_pope_truth(splits["train"], mnist_truth, "train")
    shifts = Counter((asked - true) % 10 for true, asked, a in train if a == "no")
    assert 0 not in shifts and len(shifts) >= 6, shifts


def test_cifar_pope_and_class_questions_agree_on_the_same_images(shared_dataset):
    """On CIFAR-10 the class answer and POPE's "yes" class are the same for an image; the "no" class differs."""
    shared_dataset(*CIFAR)
    classes = build_task("cifar10", seed=3)  # uncapped: capped subsets are drawn per task, so would differ
    pope = build_task("pope", seed=3)
    names = {_answer(s) for split in SPLITS for s in classes[split]}
    assert len(names) >= 5
    for split in SPLITS:
        truth = {s.id.split("-", 2)[2]: (s.image, _answer(s)) for s in classes[split]}
        for s in pope[split]:
            row, answer = s.id.split("-")[2], _answer(s)
            image, label = truth[row]
            assert torch.equal(s.image, image)
            asked = _asked_class(_question(s))
            assert asked in names and (asked == label) == (answer == "yes"), (split, label, asked, answer)


def _flickr_captions(folder) -> dict[str, list[str]]:
    out = defaultdict(list)
    with open(folder / "captions.txt", newline="") as f:
        for row in csv.DictReader(f):
            out[row["image"]].append(row["caption"])
    return out


def test_flickr8k_splits_are_disjoint_by_photo_with_all_captions(shared_dataset):
    folder = shared_dataset(*FLICKR)
    captions = _flickr_captions(folder)
    splits = build_task("flickr8k_captions", seed=0, num_train=None, num_val=None, num_test=None)
    photos = {split: {s.image.rsplit("/", 1)[-1] for s in splits[split]} for split in SPLITS}
    assert len(photos["train"]) == 800 and len(photos["test"]) == 200
    assert not photos["train"] & photos["test"] and not photos["train"] & photos["val"]
    assert photos["val"] == photos["test"]  # num_val=0 (the recipe's): val monitors on the test photos
    per_photo = Counter(s.image.rsplit("/", 1)[-1] for s in splits["train"])
    assert all(per_photo[p] == len(captions[p]) for p in photos["train"])  # one sample per caption
    for s in splits["train"]:
        assert _answer(s) in captions[s.image.rsplit("/", 1)[-1]]
    for s in splits["test"]:
        assert s.references == captions[s.image.rsplit("/", 1)[-1]] and _answer(s) in s.references
    # a real val split: three pairwise disjoint photo sets
    three = flickr8k_captions(seed=0, num_train=600, num_val=100, num_test=200)  # photo counts, not caps
    sets = [{s.image for s in three[split]} for split in SPLITS]
    assert all(sets) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


# ------------------------------------------------------------------------------------------ audio / video
def _fsdd_name(path) -> tuple[int, str, int]:
    digit, speaker, index = str(path).rsplit("/", 1)[-1][:-4].split("_")
    return int(digit), speaker, int(index)


def test_fsdd_official_split_and_spoken_digit_answers(shared_dataset):
    shared_dataset(*FSDD)
    splits = build_task("fsdd", seed=0)
    index_ok = {"test": lambda i: i <= 4, "val": lambda i: 5 <= i <= 9, "train": lambda i: i >= 10}
    for split in SPLITS:
        assert splits[split]
        for s in splits[split]:
            digit, _, index = _fsdd_name(s.audio)
            assert index_ok[split](index) and _answer(s) == str(digit), (split, s.audio)
    assert [len(splits[s]) for s in SPLITS] == [2400, 300, 300]
    assert not {s.audio for s in splits["train"]} & {s.audio for s in splits["test"]}


def test_audio_batches_are_16k_waveforms_with_lengths(shared_dataset):
    shared_dataset(*FSDD)
    dm = InstructSetsDataModule(tasks=["fsdd"], num_train=6, num_val=2, num_test=2, image_size=16, batch_size=3)
    dm.setup("fit")
    items = [dm.train_set[i] for i in range(3)]
    batch = dm.collate_fn(items)
    assert batch["audio"].dtype == torch.float32 and batch["audio"].ndim == 2
    for b, sample in enumerate(dm.train_set.samples[:3]):
        with wave.open(sample.audio, "rb") as w:
            rate, raw = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype="<i2") / 32768.0
        assert rate == 8000
        n = int(batch["audio_lengths"][b])
        assert n == 2 * len(raw)  # 8 kHz -> 16 kHz
        assert (batch["audio"][b, n:] == 0).all()
        # a real resampling: every second sample is (close to) the recording's own sample
        even = batch["audio"][b, :n:2].double().numpy()
        assert np.corrcoef(even, raw)[0, 1] > 0.99
    assert batch["audio"].shape[1] == int(batch["audio_lengths"].max())


def _centroid(frame: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.nonzero(frame[0] > 0, as_tuple=True)
    w = frame[0][ys, xs].double()
    return float((ys * w).sum() / w.sum()), float((xs * w).sum() / w.sum())


def test_video_batches_and_clips_show_the_answered_digit_and_direction(shared_dataset, mnist_truth):
    dm = InstructSetsDataModule(tasks=["video"], task_options={"video": {"frames": 4, "canvas": 32}}, num_train=6,
                                num_val=2, num_test=4, image_size=16, batch_size=4)
    dm.setup("fit")
    batch = dm.collate_fn([dm.train_set[i] for i in range(4)])
    assert batch["video"].shape == (4, 4, 3, 16, 16) and batch["video"].dtype == torch.float32
    assert all(batch["video"][b].std() > 0 for b in range(4))  # real frames, not the zero filler
    splits = build_task("video", seed=0, num_train=12, num_val=2, num_test=12, frames=5, canvas=40)
    for split in ("train", "test"):
        directions = Counter(_answer(s) for s in splits[split] if s.task == "video_direction")
        assert set(directions) == {"left", "right", "up", "down"} and len(set(directions.values())) == 1
        for s in splits[split]:
            clip = s.video()
            assert clip.shape == (5, 1, 40, 40) and clip.dtype == torch.uint8
            if s.task == "video_digit":
                digit = _true_digit(mnist_truth, split, s.video.digits[s.video.row])
                assert _answer(s) == str(digit)
                continue
            (y0, x0), (y1, x1) = _centroid(clip[0]), _centroid(clip[-1])
            moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}[_answer(s)]
            across = abs(y1 - y0) if _answer(s) in ("left", "right") else abs(x1 - x0)
            assert moved > 5 and across < 1e-6, (_answer(s), (y0, x0), (y1, x1))


def test_crossmodal_pairs_match_or_mismatch_as_answered(shared_dataset, mnist_truth):
    shared_dataset(*FSDD)
    splits = build_task("crossmodal", seed=0, num_train=30, num_val=5, num_test=30)
    for split in SPLITS:
        answers = Counter(_answer(s) for s in splits[split])
        assert answers["yes"] == answers["no"] == len(splits[split]) // 2
        for s in splits[split]:
            spoken, _, index = _fsdd_name(s.audio)
            shown = _true_digit(mnist_truth, split, s.image)  # also: the image is from MNIST's file of this split
            assert (spoken == shown) == (_answer(s) == "yes"), (split, spoken, shown, _answer(s))
            assert (index <= 4) == (split == "test")


# --------------------------------------------------------------------------------------------- determinism
def _fingerprint(splits) -> list:
    out = []
    for split in SPLITS:
        for s in splits[split]:
            media = []
            for kind in ("image", "audio", "video"):
                m = s.media(kind)
                if callable(m) and not isinstance(m, torch.Tensor):
                    m = m()
                media.append(m.tolist() if isinstance(m, torch.Tensor) else m)
            out.append((split, s.id, s.task, str(s.conversations), s.references, media))
    return out


@pytest.mark.parametrize("task", ["mnist", "pope", "fsdd", "video", "crossmodal", "flickr8k_captions"])
def test_same_seed_same_set_other_seed_another(task, shared_dataset):
    datasets, options, _ = TASK_CASES[task]
    for d in datasets:
        shared_dataset(*d)
    caps = dict(num_train=10, num_val=3, num_test=6)
    first = _fingerprint(build_task(task, seed=5, **caps, **options))
    assert first == _fingerprint(build_task(task, seed=5, **caps, **options))
    assert first != _fingerprint(build_task(task, seed=6, **caps, **options))


def test_task_repeats_repeat_a_tasks_training_samples_only(shared_dataset):
    shared_dataset(*FSDD)
    shared_dataset(*MNIST)
    caps = dict(num_train=6, num_val=2, num_test=2, image_size=16, batch_size=3)
    plain = InstructSetsDataModule(tasks=["fsdd", "mnist"], **caps)
    plain.setup("fit")
    repeated = InstructSetsDataModule(tasks=["fsdd", "mnist"], task_repeats={"fsdd": 3}, **caps)
    repeated.setup("fit")

    def ids(samples, task):
        return [s.id for s in samples if s.task == task]

    assert ids(repeated.train_set.samples, "fsdd") == ids(plain.train_set.samples, "fsdd") * 3
    assert ids(repeated.train_set.samples, "mnist") == ids(plain.train_set.samples, "mnist")
    assert [s.id for s in repeated.val_set.samples] == [s.id for s in plain.val_set.samples]
    assert repeated.vocab_size == plain.vocab_size
    for bad in ({"video": 2}, {"fsdd": 0}, {"fsdd": 1.5}):
        with pytest.raises(ValueError, match="task_repeats"):
            InstructSetsDataModule(tasks=["fsdd", "mnist"], task_repeats=bad, **caps)


def test_two_frame_clips_are_the_first_and_last_frames_of_the_longer_clips(shared_dataset):
    """The Uni-MoE recipes load `video: {frames: 2}` because the model keeps the first and last frames
    (max_video_frames 2): those must be exactly the 8-frame clip's first and last frames, question for question."""
    shared_dataset(*MNIST)
    from zoo.data.instruct_sets import video_questions

    limits = {"train": 6, "val": 2, "test": 2}
    long, short = video_questions(limits=limits, frames=8), video_questions(limits=limits, frames=2)
    for split in ("train", "test"):
        assert [s.id for s in long[split]] == [s.id for s in short[split]]
        assert [s.conversations for s in long[split]] == [s.conversations for s in short[split]]
        for a, b in zip(long[split], short[split]):
            frames8, frames2 = a.video(), b.video()
            assert frames2.shape[0] == 2 and torch.equal(frames2, frames8[[0, -1]])
