"""Instruction sets built from the real data in ``../shared/data`` (MNIST, CIFAR-10 subset, Flickr8k subset, FSDD),
in memory (:func:`build_task`, :class:`InstructSetsDataModule`) or written as LLaVA JSON + media files to a folder
the caller names (:func:`write_instruct_sets`; never inside the repository).

Tasks (``INSTRUCT_TASKS``; each gives train / val / test lists of :class:`~zoo.data.instruct.InstructSample`):

==================  ==========================================================  =====================================
task                sample                                                      split
==================  ==========================================================  =====================================
flickr8k_captions   ``<image>`` + caption request -> a human caption; train:    by photo, as the LIMoE recipe
                    one sample per caption (5 per photo); val / test: one per   (``Flickr8kCaptionsLMDataModule
                    photo, ``references`` = its 5 captions                       .photo_split``: 800 / 200 photos)
mnist               "What digit is this?" -> ``"7"``                             MNISTDataModule's (55k / 5k / 10k)
cifar10             "What is the main object in this image?" -> ``"cat"``       CIFAR10SpriteDataModule's
pope                "Is there a cat in the image?" -> ``"yes"`` / ``"no"``:     the source's (CIFAR-10 or MNIST)
                    every image gets one question about its class (yes) and
                    one about a class it does not show (no): exactly balanced
fsdd                ``<audio>`` "Which digit is spoken?" -> ``"7"``             official FSDD: indices 0-4 test,
                                                                                5-9 val, 10-49 train
video_digit,        ``<video>`` of an MNIST digit moving across a canvas:       MNIST's; directions exactly balanced
video_direction     "Which digit appears in the video?" -> ``"7"``; "In which
                    direction does the digit move?" -> ``"left"``
crossmodal          ``<audio>`` + ``<image>`` "Is the spoken digit the one in    FSDD's, each recording with an MNIST
                    the picture?" -> ``"yes"`` / ``"no"``: every recording      image of the same split: exactly
                    once with its digit, once with another                      balanced
==================  ==========================================================  =====================================

Answers (decided here): digits are answered with the numeral (``"7"``, not ``"seven"``): one token in every
tokenizer in use (open_clip BPE, Phi-2, Qwen, StableLM-2), no spelling variants, so exact match needs no
normalisation; class names and directions as lower-case words; yes/no as ``"yes"`` / ``"no"`` (POPE's labels).
Evaluation compares case-insensitively after stripping a final period.

Question templates: each task has TRAIN questions and disjoint HELD-OUT questions (:func:`check_disjoint`, tested);
train samples use train questions, val and test samples held-out ones, so the reported accuracy is on questions
never seen in training. The held-out questions are new sentences made of words the task's training questions use
(tested): a vocabulary built from training text covers them, so the test asks for paraphrase understanding rather
than robustness to unknown tokens. Which question a sample gets, which negative class, which image a recording is paired
with, a clip's direction and position: all drawn from ``seed`` (numpy generators keyed by (seed, task, split)),
so a set is the same on every build.

Sizes: ``num_train`` / ``num_val`` / ``num_test`` cap the SOURCE items per split (images, photos, recordings,
clips); a capped split takes the first items of a seeded permutation (None = all).
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from zoo.data.instruct import InstructDataModuleBase, InstructSample, PathLike, write_instruct_json
from zoo.data.paths import REPO_ROOT
from zoo.data.transforms import CLIP_MEAN, CLIP_STD

SPLITS = ("train", "val", "test")
YES, NO = "yes", "no"
DIGITS = [str(d) for d in range(10)]

# ----------------------------------------------------------------------------------------- question templates
QUESTIONS: dict[str, tuple[list[str], list[str]]] = {
    "flickr8k_captions": (
        ["Describe the image briefly.", "Write a short caption for this photo.", "What is happening in this picture?",
         "Describe what you see in one sentence."],
        ["Write a short caption for this picture.", "Describe this photo in one sentence."]),
    "mnist": (
        ["What digit is this?", "Which digit is shown in the image?", "What number is written here?",
         "Read the handwritten digit.", "Which digit do you see?"],
        ["Which number is written in the image?", "What handwritten digit do you see here?", "Read the number shown."]),
    "cifar10": (
        ["What is the main object in this image?", "What is shown in the picture?", "Name the object in the photo.",
         "What kind of thing is this?"],
        ["Name the main thing in this picture.", "What kind of object is shown in the photo?"]),
    "pope": (
        ["Is there {} in the image?", "Does the image contain {}?", "Can you see {} in this picture?"],
        ["Does this picture contain {}?", "Can you see {} in the image?"]),
    "fsdd": (
        ["Which digit is spoken?", "What number does the speaker say?", "Which digit do you hear?"],
        ["What digit does the speaker say?", "Which number is spoken?"]),
    "video_digit": (
        ["Which digit appears in the video?", "What digit moves in this clip?"],
        ["What digit appears in this clip?", "Which digit moves in the video?"]),
    "video_direction": (
        ["In which direction does the digit move?", "Where is the digit moving?"],
        ["Where does the digit move?", "In which direction is the digit moving?"]),
    "crossmodal": (
        ["Is the spoken digit the one in the picture?", "Does the number in the recording match the digit in the image?"],
        ["Does the spoken digit match the one in the picture?", "Is the number in the recording the digit in the image?"]),
}


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def check_disjoint(task: str, train: Sequence[str], heldout: Sequence[str]) -> None:
    """ValueError unless both lists are non-empty and share no question (case- and space-insensitive)."""
    if not train or not heldout:
        raise ValueError(f"{task}: train and held-out question lists must both be non-empty")
    overlap = {_normalise(q) for q in train} & {_normalise(q) for q in heldout}
    if overlap:
        raise ValueError(f"{task}: held-out questions must not be used in training; in both: {sorted(overlap)}")


for _task, (_train, _heldout) in QUESTIONS.items():
    check_disjoint(_task, _train, _heldout)


def answers_match(prediction: str, reference: str) -> bool:
    """Exact match as the sets define it: case-insensitive, spaces collapsed, a final period ignored."""
    def norm(t: str) -> str:
        return _normalise(t).rstrip(" .")

    return norm(prediction) == norm(reference)


def _rng(seed: int, task: str, split: str, purpose: str = "") -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{task}/{split}/{purpose}".encode())])


def _questions(task: str, split: str, count: int, seed: int) -> list[str]:
    train, heldout = QUESTIONS[task]
    pool = train if split == "train" else heldout
    return [pool[i] for i in _rng(seed, task, split, "question").integers(0, len(pool), count)]


def _cap(n: int, limit: Optional[int], seed: int, task: str, split: str) -> np.ndarray:
    """Positions kept of a split of ``n`` items: all in order, or the first ``limit`` of a seeded permutation."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ValueError(f"{task}: num_{split} must be >= 1 (or None for all), got {limit}")
    return np.sort(_rng(seed, task, split, "subset").permutation(n)[:limit])


def _turns(human: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]


def _article(name: str) -> str:
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


Splits = dict[str, list[InstructSample]]
Limits = dict[str, Optional[int]]


# --------------------------------------------------------------------------------------------- image sources
def _image_split_arrays(source: str, data_dir: Optional[PathLike], seed: int,
                        val_size: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """``{split: (uint8 images [N, C, H, W], labels [N])}`` and class names, from the zoo's classification
    datamodule (its split: MNIST 55k / 5k / 10k, CIFAR-10 subset 3500 / 500 / 1000 at the default val size)."""
    from zoo.data.image_classification import CIFAR10SpriteDataModule, MNISTDataModule

    if source == "mnist":
        dm, names = MNISTDataModule(data_dir=data_dir, seed=seed, val_size=val_size), DIGITS
    elif source == "cifar10":
        dm = CIFAR10SpriteDataModule(data_dir=data_dir, seed=seed, val_size=val_size)
        names = list(dm.class_names)
    else:
        raise ValueError(f"image source must be 'mnist' or 'cifar10', got {source!r}")
    out = {}
    for split, ds in zip(SPLITS, dm.build_splits()):
        rows = ds.source_indices
        out[split] = (ds.images[rows], ds.labels[rows])
    return out, names


def class_questions(task: str, source: str, data_dir: Optional[PathLike] = None, seed: int = 0,
                    limits: Optional[Limits] = None, val_size: Optional[int] = None) -> Splits:
    """"What digit is this?" (``task="mnist"``) / "What is the main object?" (``"cifar10"``) per image."""
    arrays, names = _image_split_arrays(source, data_dir, seed, val_size or (5000 if source == "mnist" else 500))
    out: Splits = {}
    for split in SPLITS:
        images, labels = arrays[split]
        keep = _cap(len(labels), (limits or {}).get(split), seed, task, split)
        questions = _questions(task, split, len(keep), seed)
        out[split] = [InstructSample(id=f"{task}-{split}-{int(i)}", conversations=_turns(f"<image>\n{q}",
                                     names[int(labels[i])]), image=images[i], task=task)
                      for q, i in zip(questions, keep)]
    return out


def pope_questions(data_dir: Optional[PathLike] = None, seed: int = 0, limits: Optional[Limits] = None,
                   source: str = "cifar10", val_size: Optional[int] = None) -> Splits:
    """POPE-style yes/no object questions: each image once about its class ("yes") and once about a class drawn
    uniformly from the others ("no"), in a seeded order."""
    arrays, names = _image_split_arrays(source, data_dir, seed, val_size or (5000 if source == "mnist" else 500))
    out: Splits = {}
    for split in SPLITS:
        images, labels = arrays[split]
        keep = _cap(len(labels), (limits or {}).get(split), seed, "pope", split)
        rng = _rng(seed, "pope", split, "negative")
        shift = rng.integers(1, len(names), len(keep))  # another class: label + shift mod C, uniform over the rest
        questions = _questions("pope", split, 2 * len(keep), seed)
        samples = []
        for n, i in enumerate(keep):
            label = int(labels[i])
            for k, (cls, answer) in enumerate(((label, YES), ((label + int(shift[n])) % len(names), NO))):
                q = questions[2 * n + k].format(_article(names[cls]))
                samples.append(InstructSample(id=f"pope-{split}-{int(i)}-{answer}", task="pope", image=images[i],
                                              conversations=_turns(f"<image>\n{q}", answer)))
        out[split] = samples
    return out


def flickr8k_captions(data_dir: Optional[PathLike] = None, seed: int = 0, limits: Optional[Limits] = None,
                      num_train: int = 800, num_test: int = 200, num_val: int = 0) -> Splits:
    """Flickr8k caption instructions, split by photo exactly as :class:`zoo.data.text.Flickr8kCaptionsLMDataModule`
    / :class:`zoo.data.image_text.Flickr8kDataModule` at the same ``seed`` / ``num_*`` (the LIMoE recipe's split).
    ``num_val=0`` makes val the test photos (monitoring only, as those datamodules do)."""
    from zoo.data.image_text import read_caption_csv
    from zoo.data.text import Flickr8kCaptionsLMDataModule

    lm = Flickr8kCaptionsLMDataModule(data_dir=data_dir, seed=seed, num_train=num_train, num_test=num_test,
                                      num_val=num_val)
    captions_file = lm.captions_file()
    groups = read_caption_csv(captions_file)
    names, captions = list(groups), list(groups.values())
    photos = lm.photo_split(len(names))
    out: Splits = {}
    for split in SPLITS:
        rows = photos[split][_cap(len(photos[split]), (limits or {}).get(split), seed, "flickr8k_captions", split)]
        if split == "train":
            pairs = [(int(r), c) for r in rows for c in captions[int(r)]]
        else:
            pairs = [(int(r), captions[int(r)][0]) for r in rows]
        questions = _questions("flickr8k_captions", split, len(pairs), seed)
        out[split] = [InstructSample(
            id=f"flickr8k-{split}-{names[r]}-{n}", task="flickr8k_captions",
            image=str(captions_file.parent / "images" / names[r]), conversations=_turns(f"<image>\n{q}", caption),
            references=None if split == "train" else list(captions[r]))
            for n, (q, (r, caption)) in enumerate(zip(questions, pairs))]
    return out


# --------------------------------------------------------------------------------------------- audio / video
def fsdd_questions(data_dir: Optional[PathLike] = None, seed: int = 0, limits: Optional[Limits] = None,
                   val_indices: int = 5) -> Splits:
    """"Which digit is spoken?" per FSDD recording (the wav path; the datamodule reads and resamples it to 16 kHz)."""
    from zoo.data.audio import fsdd_recordings, fsdd_split

    split_recs = fsdd_split(fsdd_recordings(data_dir), val_indices)
    out: Splits = {}
    for split in SPLITS:
        recs = split_recs[split]
        recs = [recs[i] for i in _cap(len(recs), (limits or {}).get(split), seed, "fsdd", split)]
        questions = _questions("fsdd", split, len(recs), seed)
        out[split] = [InstructSample(id=f"fsdd-{split}-{r.path.stem}", task="fsdd", audio=str(r.path),
                                     conversations=_turns(f"<audio>\n{q}", str(r.digit)))
                      for q, r in zip(questions, recs)]
    return out


def video_questions(data_dir: Optional[PathLike] = None, seed: int = 0, limits: Optional[Limits] = None,
                    frames: int = 8, canvas: int = 64, val_size: int = 5000) -> Splits:
    """Moving-MNIST clips (:mod:`zoo.data.video`), one per MNIST image of the split, each asked which digit it
    shows (task ``video_digit``) and where it moves (``video_direction``); directions exactly balanced (a seeded
    permutation of the four repeated)."""
    from zoo.data.video import DIRECTIONS, MovingDigitClip, check_clip_geometry

    check_clip_geometry(frames, canvas)
    arrays, _ = _image_split_arrays("mnist", data_dir, seed, val_size)
    out: Splits = {}
    for split in SPLITS:
        images, labels = arrays[split]
        keep = _cap(len(labels), (limits or {}).get(split), seed, "video", split)
        rng = _rng(seed, "video", split, "direction")
        directions = np.resize(np.arange(len(DIRECTIONS)), len(keep))[rng.permutation(len(keep))]
        clip_seeds = rng.integers(0, 2**31 - 1, len(keep))
        digit_q = _questions("video_digit", split, len(keep), seed)
        direction_q = _questions("video_direction", split, len(keep), seed)
        samples = []
        for n, i in enumerate(keep):
            direction = DIRECTIONS[int(directions[n])]
            clip = MovingDigitClip(images, int(i), direction, frames, canvas, int(clip_seeds[n]))
            samples.append(InstructSample(id=f"video-{split}-{int(i)}-digit", task="video_digit", video=clip,
                                          conversations=_turns(f"<video>\n{digit_q[n]}", DIGITS[int(labels[i])])))
            samples.append(InstructSample(id=f"video-{split}-{int(i)}-direction", task="video_direction", video=clip,
                                          conversations=_turns(f"<video>\n{direction_q[n]}", direction)))
        out[split] = samples
    return out


def crossmodal_questions(data_dir: Optional[PathLike] = None, seed: int = 0, limits: Optional[Limits] = None,
                         val_indices: int = 5, val_size: int = 5000) -> Splits:
    """Each FSDD recording with an MNIST image of its digit ("yes") and one of another digit ("no"), images drawn
    from the MNIST split of the same name (train recordings never meet test images)."""
    from zoo.data.audio import fsdd_recordings, fsdd_split

    split_recs = fsdd_split(fsdd_recordings(data_dir), val_indices)
    arrays, _ = _image_split_arrays("mnist", data_dir, seed, val_size)
    out: Splits = {}
    for split in SPLITS:
        recs = split_recs[split]
        recs = [recs[i] for i in _cap(len(recs), (limits or {}).get(split), seed, "crossmodal", split)]
        images, labels = arrays[split]
        by_digit = [np.flatnonzero(labels.numpy() == d) for d in range(10)]
        rng = _rng(seed, "crossmodal", split, "pairing")
        questions = _questions("crossmodal", split, 2 * len(recs), seed)
        samples = []
        for n, r in enumerate(recs):
            other = (r.digit + int(rng.integers(1, 10))) % 10
            for k, (digit, answer) in enumerate(((r.digit, YES), (other, NO))):
                row = int(by_digit[digit][int(rng.integers(0, len(by_digit[digit])))])
                samples.append(InstructSample(
                    id=f"crossmodal-{split}-{r.path.stem}-{answer}", task="crossmodal", audio=str(r.path),
                    image=images[row], conversations=_turns(f"<audio>\n<image>\n{questions[2 * n + k]}", answer)))
        out[split] = samples
    return out


INSTRUCT_TASKS: dict[str, Callable[..., Splits]] = {
    "flickr8k_captions": flickr8k_captions,
    "mnist": lambda **kw: class_questions("mnist", "mnist", **kw),
    "cifar10": lambda **kw: class_questions("cifar10", "cifar10", **kw),
    "pope": pope_questions,
    "fsdd": fsdd_questions,
    "video": video_questions,
    "crossmodal": crossmodal_questions,
}


def build_task(task: str, data_dir: Optional[PathLike] = None, seed: int = 0, num_train: Optional[int] = None,
               num_val: Optional[int] = None, num_test: Optional[int] = None, **options: Any) -> Splits:
    """One task's ``{"train", "val", "test"}`` sample lists (``options``: the builder's own arguments, e.g.
    ``source="mnist"`` for pope, ``frames`` for video)."""
    if task not in INSTRUCT_TASKS:
        raise ValueError(f"unknown instruction task {task!r}; choose from {sorted(INSTRUCT_TASKS)}")
    limits = {"train": num_train, "val": num_val, "test": num_test}
    return INSTRUCT_TASKS[task](data_dir=data_dir, seed=seed, limits=limits, **options)


# ------------------------------------------------------------------------------------------------- writing
def _inside_repo(folder: Path) -> bool:
    try:
        folder.resolve().relative_to(REPO_ROOT)
        return True
    except ValueError:
        return False


def write_instruct_sets(splits: Splits, folder: PathLike) -> dict[str, Path]:
    """Write ``{split: samples}`` as ``folder/{split}.json`` (LLaVA format) with media under ``folder/media/``:
    images as PNG, videos as ``.npy`` uint8 ``[T, C, H, W]``, audio and image files copied. Returns the JSON paths.
    Refuses a folder inside the repository (data never goes into it)."""
    from PIL import Image

    root = Path(folder).expanduser()
    if _inside_repo(root):
        raise ValueError(f"{root} is inside the repository {REPO_ROOT}; write instruction sets elsewhere "
                         "(data never goes into the repo)")
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for split, samples in splits.items():
        records = []
        for s in samples:
            fields: dict[str, Any] = {}
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in s.id)
            for kind, ext in (("image", ".png"), ("audio", ".wav"), ("video", ".npy")):
                source = s.media(kind)
                if source is None:
                    continue
                if callable(source) and not isinstance(source, torch.Tensor):
                    source = source()
                if isinstance(source, (str, os.PathLike)):
                    target = media / f"{safe}.{kind}{Path(source).suffix}"
                    shutil.copyfile(source, target)
                elif kind == "image":
                    target = media / f"{safe}.png"
                    array = source.to(torch.uint8).permute(1, 2, 0).numpy()
                    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(target)
                elif kind == "video":
                    target = media / f"{safe}.npy"
                    np.save(target, source.to(torch.uint8).numpy())
                else:
                    raise TypeError(f"sample {s.id}: in-memory audio cannot be written; give it as a wav path")
                fields[kind] = str(target.relative_to(root))
            records.append(InstructSample(id=s.id, conversations=s.conversations, task=s.task,
                                          references=s.references, **fields))
        written[split] = write_instruct_json(records, root / f"{split}.json")
    return written


# --------------------------------------------------------------------------------------------- datamodule
class InstructSetsDataModule(InstructDataModuleBase):
    """A mixture of the built-in instruction tasks, in memory (module docstring), as one datamodule.

    Args:
        tasks: task names of :data:`INSTRUCT_TASKS` (their samples are concatenated per split; ``task_index`` in
            batches says which task a sample is from, ``task_names`` lists them sorted).
        data_dir: data root (None: ``$ZOO_DATA``, then ``<repo>/../shared/data``; :mod:`zoo.data.paths`).
        num_train / num_val / num_test: caps on source items per split and task (None = all).
        task_options: per-task builder arguments, e.g. ``{"pope": {"source": "mnist"}, "video": {"frames": 4}}``
            (for the tasks of ``tasks`` and of ``vocabulary_tasks``).
        task_repeats: how many times each epoch repeats a task's TRAINING samples (default 1), e.g. ``{"fsdd": 8}``:
            balances a mixture in which one task has far fewer items (FSDD has 2,400 training recordings, MNIST
            55,000 images, and the video task two questions per clip). Validation and test are never repeated.
        vocabulary_tasks: build the compact vocabulary from the training text of these tasks (a superset of
            ``tasks``, same caps and options) instead of ``tasks`` alone. Stages that train on part of the
            mixture (Uni-MoE stage 2: one modality per run) then share the vocabulary of the stages that train on
            all of it, so their checkpoints fit one model. None = ``tasks``.
        The rest: as :class:`zoo.data.instruct.InstructDataModule` (template, tokenizer, image size / mean / std /
        aspect, max_length, truncation, tokens per medium, batch_size, num_workers, seed, pin_memory).
    """

    def __init__(self, tasks: Sequence[str] = ("mnist",), data_dir: Optional[PathLike] = None,
                 num_train: Optional[int] = None, num_val: Optional[int] = None, num_test: Optional[int] = None,
                 task_options: Optional[dict[str, dict[str, Any]]] = None, template: str = "tiny",
                 tokenizer: Any = "compact", image_size: int = 224, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, image_aspect: str = "pad", max_length: Optional[int] = 2048,
                 truncation: str = "error", tokens_per_image: int = 1, tokens_per_audio: int = 1,
                 tokens_per_video: int = 1, vocabulary_tasks: Optional[Sequence[str]] = None,
                 task_repeats: Optional[dict[str, int]] = None, **loader: Any) -> None:
        super().__init__(template, tokenizer, image_size, image_mean, image_std, image_aspect, max_length, truncation,
                         tokens_per_image, tokens_per_audio, tokens_per_video, None, **loader)
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        unknown = [t for t in tasks if t not in INSTRUCT_TASKS]
        if not tasks or unknown or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be distinct names from {sorted(INSTRUCT_TASKS)}, got {tasks}")
        vocab_tasks = None if vocabulary_tasks is None else (
            [vocabulary_tasks] if isinstance(vocabulary_tasks, str) else list(vocabulary_tasks))
        if vocab_tasks is not None:
            if tokenizer != "compact":
                raise ValueError("vocabulary_tasks builds the compact vocabulary; it cannot be combined with a "
                                 "tokenizer object (that tokenizer's vocabulary is already shared)")
            missing = [t for t in tasks if t not in vocab_tasks]
            unknown = [t for t in vocab_tasks if t not in INSTRUCT_TASKS]
            if missing or unknown:
                raise ValueError(f"vocabulary_tasks must name known tasks and include every task trained on; "
                                 f"missing {missing}, unknown {unknown} (known: {sorted(INSTRUCT_TASKS)})")
        extra = set(task_options or {}) - set(tasks) - set(vocab_tasks or ())
        if extra:
            raise ValueError(f"task_options names tasks not in tasks or vocabulary_tasks: {sorted(extra)}")
        repeats = dict(task_repeats or {})
        bad = {t: n for t, n in repeats.items()
               if t not in tasks or isinstance(n, bool) or not isinstance(n, int) or n < 1}
        if bad:
            raise ValueError(f"task_repeats must map tasks of {tasks} to whole numbers >= 1, got {bad}")
        self.task_repeats = repeats
        self.tasks, self.data_dir, self.vocabulary_tasks = tasks, data_dir, vocab_tasks
        self.limits = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
        self.task_options = {k: dict(v) for k, v in (task_options or {}).items()}
        self.save_hyperparameters(ignore=["tokenizer"])

    def load_samples(self) -> tuple[list[InstructSample], list[InstructSample], list[InstructSample]]:
        merged: Splits = {split: [] for split in SPLITS}
        for task in self.tasks:
            built = build_task(task, self.data_dir, self.seed, **self.limits, **self.task_options.get(task, {}))
            for split in SPLITS:
                merged[split] += built[split] * (self.task_repeats.get(task, 1) if split == "train" else 1)
        return merged["train"], merged["val"], merged["test"]

    def _make_tokenizer(self, train: list[InstructSample]) -> Any:
        if self.vocabulary_tasks is None or self._restored_tokenizer is not None:
            return super()._make_tokenizer(train)
        # the stage's own tasks are in `train` already; only the others are built (the vocabulary is a set of
        # tokens, so the order of the texts does not matter)
        extra = [s for task in self.vocabulary_tasks if task not in self.tasks
                 for s in build_task(task, self.data_dir, self.seed, **self.limits,
                                     **self.task_options.get(task, {}))["train"]]
        return super()._make_tokenizer(train + extra)


__all__ = [
    "INSTRUCT_TASKS",
    "QUESTIONS",
    "InstructSetsDataModule",
    "answers_match",
    "build_task",
    "check_disjoint",
    "write_instruct_sets",
]


# How each task's test answers are scored (zoo.tasks.instruct.score_answers): exact match for every task; yes/no tasks
# also report accuracy and the share of "yes" answers (POPE's yes-ratio); caption tasks BLEU-4 and CIDEr-D.
TASK_METRICS: dict[str, str] = {"pope": "yes_no", "crossmodal": "yes_no", "flickr8k_captions": "caption"}
