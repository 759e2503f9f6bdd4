"""Instruction data in the LLaVA format for multimodal LMs (MoE-LLaVA-style and Uni-MoE).

A sample is ``{"id", "image" (path relative to the media folder, optional), "audio" (wav path, optional), "video"
(``.npy`` uint8 ``[T, C, H, W]`` path, optional), "conversations": [{"from": "human"|"gpt", "value"}, ...]}``; in
memory (:class:`InstructSample`) a medium may also be a tensor or a zero-argument callable that returns one (clips
rendered on demand). A conversation names each medium once with its tag (``<image>``, ``<audio>``, ``<video>``)
where the media tokens go; one medium of each kind per sample.

Batches (:class:`InstructCollator`, right padding):

- ``input_ids`` int64 ``[B, L]``: text ids with one placeholder per medium (-200 image, -300 audio, -400 video;
  :mod:`zoo.data.templates`), padded with the tokenizer's pad id;
- ``attention_mask`` bool ``[B, L]`` (False on padding); ``labels`` int64 ``[B, L]`` (-100 = not learned: system,
  human turns, roles, placeholders, padding);
- ``images`` float32 ``[B, 3, S, S]``, normalised for the vision tower (:class:`ImageProcessor`); zeros for a sample
  without an image (it has no placeholder, so the model ignores them, as the official code does);
- when the split has audio: ``audio`` float32 ``[B, samples]`` mono at 16 kHz, zero-padded, and ``audio_lengths``
  int64 ``[B]`` (0 = no audio); the audio tower computes log-mel features from these waveforms;
- when the split has video: ``video`` float32 ``[B, T, 3, S, S]`` (each frame as an image; zeros without video);
- ``index`` int64 ``[B]`` (the sample's position in its split) and ``task_index`` int64 ``[B]`` (into the
  datamodule's ``task_names``), for per-task evaluation.

Length: ``max_length`` counts positions AFTER splicing, each placeholder counting ``tokens_per_image`` /
``tokens_per_audio`` / ``tokens_per_video`` positions (set them to the towers' token counts). A longer sample is an
error (``truncation="error"``, the default: it names the sample) or is cut on the right (``"right"``) as long as no
placeholder is cut and an answer token is left.

Tokenizer: ``"compact"`` (default) builds :class:`~zoo.data.templates.CompactTokenizer` from the TRAIN split's text
only and keeps it in the datamodule's ``state_dict`` (so a checkpoint decodes as it was trained); or pass any object
with the :class:`~zoo.data.templates.TextTokenizer` interface plus ``pad_token_id``.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.data.base import LoaderArgs, SplitDataModule, check_positive_int
from zoo.data.templates import (
    IGNORE_INDEX,
    MEDIA_KINDS,
    CompactTokenizer,
    ConversationError,
    ConversationTemplate,
    check_conversation,
    count_media,
    get_template,
)
from zoo.data.transforms import CLIP_MEAN, CLIP_STD

PathLike = Union[str, os.PathLike]
MediaSource = Union[str, os.PathLike, torch.Tensor, Callable[[], torch.Tensor], None]


@dataclass
class InstructSample:
    """One instruction sample (see the module docstring). ``references``: every acceptable answer to the last
    question (e.g. the 5 captions of a photo) for evaluation; default: the last gpt turn."""

    id: str
    conversations: list[dict[str, str]]
    image: MediaSource = None
    audio: MediaSource = None
    video: MediaSource = None
    task: str = "instruct"
    references: Optional[list[str]] = None

    def media(self, kind: str) -> MediaSource:
        return getattr(self, kind)

    def to_json(self) -> dict[str, Any]:
        """The LLaVA JSON record (media must be paths by now)."""
        out: dict[str, Any] = {"id": self.id}
        for kind in MEDIA_KINDS:
            source = self.media(kind)
            if source is not None:
                if not isinstance(source, (str, os.PathLike)):
                    raise TypeError(f"sample {self.id}: {kind} is a {type(source).__name__}; write it to a file first")
                out[kind] = str(source)
        out["conversations"] = self.conversations
        if self.task != "instruct":
            out["task"] = self.task
        if self.references is not None:
            out["references"] = list(self.references)
        return out


def read_instruct_json(path: PathLike) -> list[InstructSample]:
    """A LLaVA-format JSON file (a list of records) -> samples. ``"image"`` may be a string or a list of one
    string. Errors name the file and the record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction JSON not found: {path}")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of samples, got {type(records).__name__}")
    samples = []
    for i, rec in enumerate(records):
        where = f"{path} record {i}"
        if not isinstance(rec, dict) or "conversations" not in rec:
            raise ValueError(f"{where}: each sample needs a 'conversations' list, got {str(rec)[:200]}")
        media: dict[str, Any] = {}
        for kind in MEDIA_KINDS:
            value = rec.get(kind)
            if isinstance(value, list):
                if len(value) != 1:
                    raise ValueError(f"{where}: {len(value)} {kind} files; one {kind} per sample is supported "
                                     "(split the sample or drop the extra files)")
                value = value[0]
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}: '{kind}' must be a relative file path, got {value!r}")
            media[kind] = value
        samples.append(InstructSample(id=str(rec.get("id", i)), conversations=rec["conversations"],
                                      task=str(rec.get("task", "instruct")), references=rec.get("references"),
                                      **media))
    return samples


def write_instruct_json(samples: Sequence[InstructSample], path: PathLike) -> Path:
    """Write samples (media given as relative paths) as a LLaVA-format JSON list."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([s.to_json() for s in samples], indent=1), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- media
class ImageProcessor:
    """PIL image or image tensor -> float32 ``[3, size, size]`` for the vision tower, as the official CLIP / SigLIP
    processors do: RGB, (``aspect="pad"``, MoE-LLaVA's ``--image_aspect_ratio pad``) pad to a square with the mean
    colour, resize (bicubic) the shorter side to ``size`` and centre-crop, scale to [0, 1], normalise with
    ``mean`` / ``std``. ``aspect="crop"`` skips the padding. Tensors may be uint8 ``[C, H, W]`` (C = 1 or 3) or
    float in [0, 1]."""

    def __init__(self, size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 aspect: str = "pad") -> None:
        self.size = check_positive_int("image_size", size)
        if aspect not in ("pad", "crop"):
            raise ValueError(f"aspect must be 'pad' (square with the mean colour) or 'crop', got {aspect!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
        self.aspect = aspect
        self.mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(3, 1, 1)
        self.fill = tuple(int(m * 255) for m in mean)  # the official pad colour

    def to_pil(self, image: Any):  # noqa: ANN201 (PIL.Image)
        from PIL import Image

        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image must be a PIL image or a [C, H, W] tensor with C = 1 or 3, got "
                             f"{getattr(image, 'shape', type(image).__name__)}")
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        array = image.to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")

    def __call__(self, image: Any) -> torch.Tensor:
        from PIL import Image

        if (isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] in (1, 3)
                and image.shape[1] == image.shape[2] == self.size):
            # already square at the output size (MNIST, video frames): PIL would neither pad, resize nor crop, so
            # skip the round trip; the same uint8 rounding keeps the values bit-identical to the PIL path
            if image.is_floating_point():
                image = (image.clamp(0, 1) * 255).round()
            return self.normalise_uint8(image.to(torch.uint8))
        img = self.to_pil(image)
        w, h = img.size
        if self.aspect == "pad" and w != h:
            side = max(w, h)
            square = Image.new("RGB", (side, side), self.fill)
            square.paste(img, ((side - w) // 2, (side - h) // 2))
            img, w, h = square, side, side
        scale = self.size / min(w, h)
        nw, nh = max(self.size, int(w * scale)), max(self.size, int(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        return self.normalise_uint8(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))

    @property
    def lut(self) -> torch.Tensor:
        """float32 ``[3, 256]``: channel ``c``'s normalised value of the uint8 pixel value ``v``, computed with the
        same float32 operations as the per-pixel formula ``(v / 255 - mean[c]) / std[c]`` (so a look-up gives
        bit-identical values)."""
        lut = getattr(self, "_lut", None)
        if lut is None:
            values = torch.arange(256, dtype=torch.uint8).float().view(1, 256) / 255.0
            lut = self._lut = ((values - self.mean.view(3, 1)) / self.std.view(3, 1)).contiguous()
        return lut

    def normalise_uint8(self, pixels: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
        """uint8 ``[..., C, H, W]`` (C = 1: grayscale, repeated to RGB; or 3) -> float32 ``[..., 3, H, W]``
        normalised (scale to [0, 1], ``(x - mean) / std``) by table look-up (numpy: far fewer per-call overheads
        than torch ops at these sizes)."""
        array = pixels.numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
        if array.dtype != np.uint8 or array.ndim < 3 or array.shape[-3] not in (1, 3):
            raise ValueError(f"expected uint8 [..., C, H, W] with C = 1 or 3, got {array.dtype} "
                             f"{tuple(array.shape)}")
        lut = self.lut.numpy()
        out = np.empty((*array.shape[:-3], 3, *array.shape[-2:]), dtype=np.float32)
        gray = array.shape[-3] == 1
        for c in range(3):
            out[..., c, :, :] = lut[c][array[..., 0 if gray else c, :, :]]
        return torch.from_numpy(out)


def _resolve(source: MediaSource, root: Optional[Path]) -> MediaSource:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        return path if path.is_absolute() or root is None else root / path
    return source


def _materialise(source: MediaSource) -> Any:
    return source() if callable(source) and not isinstance(source, torch.Tensor) else source


# -------------------------------------------------------------------------------------------------- dataset
class InstructDataset(Dataset):
    """Samples encoded once (at construction) with ``template`` and ``tokenizer``; media loaded on access.

    Checked at construction (errors name the sample): the conversation (:func:`check_conversation`), one tag per
    medium the sample has and none for media it lacks, media files exist, the spliced length fits ``max_length``.
    """

    def __init__(self, samples: Sequence[InstructSample], template: ConversationTemplate, tokenizer: Any,
                 image_processor: ImageProcessor, media_root: Optional[PathLike] = None,
                 max_length: Optional[int] = None, truncation: str = "error",
                 media_tokens: Optional[dict[str, int]] = None, task_names: Optional[Sequence[str]] = None,
                 sample_rate: int = 16000) -> None:
        if truncation not in ("error", "right"):
            raise ValueError(f"truncation must be 'error' or 'right', got {truncation!r}")
        self.samples = list(samples)
        self.template, self.image_processor = template, image_processor
        self.media_root = None if media_root is None else Path(media_root).expanduser()
        self.max_length, self.truncation = max_length, truncation
        self.media_tokens = {kind: 1 for kind in MEDIA_KINDS} | dict(media_tokens or {})
        self.sample_rate = int(sample_rate)
        self.task_names = list(task_names) if task_names is not None else sorted({s.task for s in self.samples})
        self._task_of = {name: i for i, name in enumerate(self.task_names)}
        self.has = {kind: any(s.media(kind) is not None for s in self.samples) for kind in MEDIA_KINDS}
        self._check_media()
        self.retokenize(tokenizer)

    def _check_media(self) -> None:
        missing = []
        for s in self.samples:
            tags = count_media(check_conversation(s.conversations, f"sample {s.id}"))
            for kind in MEDIA_KINDS:
                have, n = s.media(kind) is not None, tags[kind]
                if n > int(have):
                    raise ConversationError(
                        f"sample {s.id}: {n} <{kind}> tag(s) but {int(have)} {kind}(s); a sample carries at most one "
                        f"{kind}, named once by its tag: remove the extra tags" + ("" if have else f" or add the {kind}"))
                if have and n == 0:
                    raise ConversationError(f"sample {s.id} has a(n) {kind} but no <{kind}> tag in its conversation; "
                                            f"put <{kind}> in the human turn where the {kind} goes, or drop the {kind}")
                source = _resolve(s.media(kind), self.media_root)
                if isinstance(source, Path) and not source.is_file():
                    missing.append(f"{s.id}: {source}")
            if s.task not in self._task_of:
                raise ValueError(f"sample {s.id}: task {s.task!r} is not among the task names {self.task_names}")
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            root = self.media_root if self.media_root is not None else "the working directory"
            raise FileNotFoundError(f"{len(missing)} media file(s) are missing (paths are relative to {root}): "
                                    f"{'; '.join(missing[:5])}{more}. Fix image_folder or the JSON paths.")

    def _spliced_length(self, ids: list[int]) -> np.ndarray:
        """Cumulative spliced length after each position ``[len(ids)]``."""
        extra = {MEDIA_KINDS[k]: self.media_tokens[k] for k in MEDIA_KINDS}
        return np.cumsum([extra.get(i, 1) for i in ids])

    def retokenize(self, tokenizer: Any) -> None:
        """Encode every sample with ``tokenizer`` (also used when a checkpoint's tokenizer replaces the built one)."""
        self.tokenizer = tokenizer
        self.input_ids, self.labels = [], []
        for s in self.samples:
            enc = self.template.encode(s.conversations, tokenizer, sample=f"sample {s.id}")
            ids, labels = enc.input_ids, enc.labels
            if self.max_length is not None:
                cum = self._spliced_length(ids)
                if cum[-1] > self.max_length:
                    if self.truncation == "error":
                        raise ValueError(f"sample {s.id} is {int(cum[-1])} positions long after splicing media, over "
                                         f"max_length={self.max_length}; raise max_length, shorten the conversation, "
                                         "or pass truncation='right'")
                    keep = int(np.searchsorted(cum, self.max_length, side="right"))
                    if any(i < 0 for i in ids[keep:]):
                        raise ValueError(f"sample {s.id}: cutting it to max_length={self.max_length} would cut a media "
                                         "placeholder; raise max_length or shorten the text before the medium")
                    ids, labels = ids[:keep], labels[:keep]
                    if all(t == IGNORE_INDEX for t in labels):
                        raise ValueError(f"sample {s.id}: after cutting to max_length={self.max_length} no answer "
                                         "token is left to learn; raise max_length or shorten the prompt")
            self.input_ids.append(torch.tensor(ids, dtype=torch.long))
            self.labels.append(torch.tensor(labels, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, kind: str, i: int) -> Optional[torch.Tensor]:
        """Sample ``i``'s ``kind`` processed: image ``[3, S, S]``, audio ``[samples]`` at 16 kHz, video
        ``[T, 3, S, S]``; None when it has none."""
        source = _resolve(self.samples[i].media(kind), self.media_root)
        if kind == "video" and self._plain_processor and callable(getattr(source, "normalised", None)):
            frames = source.normalised(self.image_processor)  # e.g. a moving-digit clip, painted pre-normalised
            if frames is not None:
                return frames
        source = _materialise(source)
        if source is None:
            return None
        if kind == "image":
            if isinstance(source, Path):
                from PIL import Image, UnidentifiedImageError

                try:
                    with Image.open(source) as img:
                        return self.image_processor(img.convert("RGB"))
                except (UnidentifiedImageError, OSError) as err:
                    raise ValueError(f"sample {self.samples[i].id}: cannot read image {source}: {err}") from err
            return self.image_processor(source)
        if kind == "audio":
            if isinstance(source, Path):
                from zoo.data.audio import load_audio

                source = load_audio(source, self.sample_rate)
            if source.ndim != 1 or source.numel() == 0:
                raise ValueError(f"sample {self.samples[i].id}: audio must be a non-empty mono waveform [samples] at "
                                 f"{self.sample_rate} Hz, got shape {tuple(source.shape)}")
            return source.to(torch.float32)
        if isinstance(source, Path):  # video: a .npy of uint8 [T, C, H, W]
            source = torch.from_numpy(np.load(source))
        if source.ndim != 4 or source.shape[0] == 0:
            raise ValueError(f"sample {self.samples[i].id}: a video must be [T, C, H, W] with T >= 1, got "
                             f"{tuple(source.shape)}")
        if (self._plain_processor and source.dtype == torch.uint8 and source.shape[1] in (1, 3)
                and source.shape[2] == source.shape[3] == self.image_processor.size):
            return self.image_processor.normalise_uint8(source)  # all frames at once; the per-frame values
        return torch.stack([self.image_processor(frame) for frame in source])

    @property
    def _plain_processor(self) -> bool:
        """The image processor is an :class:`ImageProcessor` with its own ``__call__`` (so its vectorised
        shortcuts give what calling it per frame would)."""
        return isinstance(self.image_processor, ImageProcessor) and (
            type(self.image_processor).__call__ is ImageProcessor.__call__)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.input_ids[i], "labels": self.labels[i],
                                "index": i, "task_index": self._task_of[self.samples[i].task]}
        for kind in MEDIA_KINDS:
            if self.has[kind] or kind == "image":
                item[kind] = self.load(kind, i)
        return item

    def prompt(self, i: int) -> tuple[torch.Tensor, list[str]]:
        """For generation: ``(ids int64 [P] up to the last answer, references)`` of sample ``i``."""
        s = self.samples[i]
        ids, answer = self.template.encode_prompt(s.conversations, self.tokenizer, sample=f"sample {s.id}")
        return torch.tensor(ids, dtype=torch.long), list(s.references) if s.references is not None else [answer]


class InstructCollator:
    """Pads a list of :class:`InstructDataset` items into a batch (see the module docstring)."""

    def __init__(self, pad_token_id: int, image_size: int) -> None:
        self.pad_token_id, self.image_size = int(pad_token_id), int(image_size)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        B, L = len(items), max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(B, L, dtype=torch.bool)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = it["input_ids"], it["labels"], True
        images = _stack_rows([it["image"] for it in items], (3, self.image_size, self.image_size))
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "images": images,
                 "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
                 "task_index": torch.tensor([int(it["task_index"]) for it in items], dtype=torch.long)}
        if "audio" in items[0]:
            lengths = torch.tensor([0 if it["audio"] is None else len(it["audio"]) for it in items], dtype=torch.long)
            audio, zeroed = _batch_tensor((B, max(1, int(lengths.max()))))
            for b, it in enumerate(items):
                n = int(lengths[b])
                if n:
                    audio[b, :n] = it["audio"]
                if not zeroed:
                    audio[b, n:].zero_()
            batch["audio"], batch["audio_lengths"] = audio, lengths
        if "video" in items[0]:
            clips = [it["video"] for it in items if it["video"] is not None]
            shape = clips[0].shape if clips else (1, 3, self.image_size, self.image_size)
            if any(c.shape != shape for c in clips):
                raise ValueError(f"videos of one batch must have the same frame count and size, got "
                                 f"{sorted({tuple(c.shape) for c in clips})}")
            batch["video"] = _stack_rows([it["video"] for it in items], tuple(shape))
        return batch


def _batch_tensor(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, bool]:
    """An uninitialised batch tensor and whether it is known to hold zeros already (fresh pages), so the caller
    writes only the rows it has. In a DataLoader worker it is in shared memory already (as ``default_collate``
    does), so sending the batch to the main process does not copy it again; in the main process a large one is
    an anonymous mapping advised for transparent huge pages where the kernel offers them (touching 100 MB of
    fresh 4 KiB pages costs ~50 ms; huge pages ~10 ms)."""
    shape = tuple(int(n) for n in shape)
    numel = int(np.prod(shape))
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
        return torch.empty(0, dtype=dtype).new(storage).view(shape), True  # a new shared-memory file: zeros
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if nbytes >= _HUGE_BATCH_BYTES:
        try:
            buffer = mmap.mmap(-1, nbytes)  # anonymous: zero-filled
            if hasattr(mmap, "MADV_HUGEPAGE"):
                buffer.madvise(mmap.MADV_HUGEPAGE)
            return torch.frombuffer(buffer, dtype=dtype).view(shape), True  # the tensor keeps the mapping alive
        except (OSError, ValueError, AttributeError):
            pass
    return torch.empty(shape, dtype=dtype), False


_HUGE_BATCH_BYTES = 8 << 20


def _stack_rows(rows: Sequence[Optional[torch.Tensor]], shape: Sequence[int]) -> torch.Tensor:
    """float32 ``[len(rows), *shape]``: each row's tensor, zeros where it is None (each value written once)."""
    out, zeroed = _batch_tensor((len(rows), *shape))
    for b, row in enumerate(rows):
        if row is not None:
            out[b].copy_(row)
        elif not zeroed:
            out[b].zero_()
    return out


# ----------------------------------------------------------------------------------------------- datamodules
class InstructDataModuleBase(SplitDataModule):
    """Tokenizer, template, media processing and padding for instruction data; a subclass gives the samples
    (:meth:`load_samples`). Arguments as :class:`InstructDataModule` (all but the JSON paths).

    Attributes for models / tasks (after :meth:`setup`): ``tokenizer``, ``vocab_size``, ``pad_token_id``,
    ``eos_token_id``, ``template``, ``image_size``, ``task_names``.
    """

    loader_defaults = LoaderArgs(batch_size=16)

    def __init__(self, template: str = "tiny", tokenizer: Any = "compact", image_size: int = 224,
                 image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD,
                 image_aspect: str = "pad", max_length: Optional[int] = 2048, truncation: str = "error",
                 tokens_per_image: int = 1, tokens_per_audio: int = 1, tokens_per_video: int = 1,
                 media_root: Optional[PathLike] = None, **loader: Any) -> None:
        super().__init__(**loader)
        self.template = get_template(template)
        if isinstance(tokenizer, str) and tokenizer != "compact":
            raise ValueError(f"tokenizer must be 'compact' or a tokenizer object, got {tokenizer!r}")
        self.tokenizer_spec = tokenizer
        self.tokenizer: Any = None if tokenizer == "compact" else tokenizer
        self.image_processor = ImageProcessor(image_size, image_mean, image_std, image_aspect)
        self.image_size = self.image_processor.size
        self.max_length = None if max_length is None else check_positive_int("max_length", max_length)
        if truncation not in ("error", "right"):
            raise ValueError(f"truncation must be 'error' or 'right', got {truncation!r}")
        self.truncation = truncation
        self.media_tokens = {"image": check_positive_int("tokens_per_image", tokens_per_image),
                             "audio": check_positive_int("tokens_per_audio", tokens_per_audio),
                             "video": check_positive_int("tokens_per_video", tokens_per_video)}
        self.media_root = media_root
        self.task_names: list[str] = []
        self._restored_tokenizer: Optional[dict[str, Any]] = None

    def load_samples(self) -> tuple[list[InstructSample], list[InstructSample], list[InstructSample]]:
        raise NotImplementedError(f"{type(self).__name__} must implement load_samples()")

    # ----------------------------------------------------------------------------------------- tokenizer
    @property
    def vocab_size(self) -> int:
        if self.tokenizer is None:
            self.setup()
        size = getattr(self.tokenizer, "vocab_size", None)
        if size is None:
            raise AttributeError("the tokenizer has no vocab_size; give the model's vocabulary size explicitly")
        return int(size)

    @property
    def pad_token_id(self) -> int:
        return int(getattr(self.tokenizer, "pad_token_id", None) or 0)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def _make_tokenizer(self, train: list[InstructSample]) -> Any:
        if self.tokenizer_spec != "compact":
            return self.tokenizer_spec
        if self._restored_tokenizer is not None:
            return CompactTokenizer.from_state_dict(self._restored_tokenizer)
        return CompactTokenizer.build(t for s in train for t in self.template.texts(s.conversations, f"sample {s.id}"))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if isinstance(self.tokenizer, CompactTokenizer):
            state["tokenizer"] = self.tokenizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("tokenizer")
        if saved is None or self.tokenizer_spec != "compact":
            return
        self._restored_tokenizer = dict(saved)
        if self.train_set is not None:  # already set up: re-encode every split with the checkpoint's vocabulary
            restored = CompactTokenizer.from_state_dict(saved)
            if restored != self.tokenizer:
                self.tokenizer = restored
                for ds in (self.train_set, self.val_set, self.test_set):
                    ds.retokenize(restored)  # type: ignore[union-attr]

    # ------------------------------------------------------------------------------------------- splits
    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        train, val, test = self.load_samples()
        if not train:
            raise ValueError(f"{type(self).__name__}: the train split has no samples")
        self.task_names = sorted({s.task for s in (*train, *val, *test)})
        self.tokenizer = self._make_tokenizer(train)
        if getattr(self.tokenizer, "pad_token_id", None) is None:
            raise ValueError("the tokenizer needs a pad_token_id (padding of input_ids; labels there are -100)")
        self.collate_fn = InstructCollator(self.pad_token_id, self.image_size)
        return tuple(InstructDataset(samples, self.template, self.tokenizer, self.image_processor, self.media_root,
                                     self.max_length, self.truncation, self.media_tokens, self.task_names)
                     for samples in (train, val, test))  # type: ignore[return-value]

    def predict_dataloader(self):  # noqa: ANN201
        return self.test_dataloader()


class InstructDataModule(InstructDataModuleBase):
    """LLaVA-format instruction JSON files + a media folder.

    Args:
        train_json: the training samples (required).
        val_json / test_json: optional; without ``val_json`` a seeded ``val_size`` hold-out of the training samples
            is the val split (``val_size=0``: no val split; an empty one); without ``test_json`` test is empty.
        image_folder: the folder media paths are relative to (LLaVA's ``--image_folder``; audio and video paths
            too); default: the JSON file's folder.
        template: conversation template name (:data:`zoo.data.templates.TEMPLATES`): ``"tiny"``, ``"tiny_plain"``,
            ``"plain"``, ``"stablelm"``, ``"phi"``, ``"qwen"``.
        tokenizer: ``"compact"`` or a tokenizer object (module docstring).
        image_size, image_mean, image_std, image_aspect: the vision tower's input (:class:`ImageProcessor`).
        max_length, truncation, tokens_per_image / _audio / _video: see the module docstring.
        batch_size, num_workers, seed, pin_memory, persistent_workers: as every zoo datamodule
            (:class:`~zoo.data.base.LoaderArgs`); ``batch_size`` defaults to 16 here.
    """

    def __init__(self, train_json: PathLike = "train.json", val_json: Optional[PathLike] = None,
                 test_json: Optional[PathLike] = None, image_folder: Optional[PathLike] = None, val_size: int = 0,
                 template: str = "tiny", tokenizer: Any = "compact", image_size: int = 224,
                 image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD,
                 image_aspect: str = "pad", max_length: Optional[int] = 2048, truncation: str = "error",
                 tokens_per_image: int = 1, tokens_per_audio: int = 1, tokens_per_video: int = 1,
                 **loader: Any) -> None:
        folder = image_folder if image_folder is not None else Path(train_json).expanduser().parent
        super().__init__(template, tokenizer, image_size, image_mean, image_std, image_aspect, max_length, truncation,
                         tokens_per_image, tokens_per_audio, tokens_per_video, folder, **loader)
        self.train_json, self.val_json, self.test_json = train_json, val_json, test_json
        self.val_size = check_positive_int("val_size", val_size, minimum=0)
        if image_folder is not None and not Path(image_folder).expanduser().is_dir():
            raise FileNotFoundError(f"image_folder not found: {image_folder}. Pass the folder the JSON's media paths "
                                    "are relative to (CLI: --data.image_folder).")
        self.save_hyperparameters(ignore=["tokenizer"])

    def load_samples(self) -> tuple[list[InstructSample], list[InstructSample], list[InstructSample]]:
        train = read_instruct_json(self.train_json)
        test = read_instruct_json(self.test_json) if self.test_json is not None else []
        if self.val_json is not None:
            return train, read_instruct_json(self.val_json), test
        if self.val_size:
            if self.val_size >= len(train):
                raise ValueError(f"val_size={self.val_size} must be smaller than the {len(train)} training samples")
            order = np.random.default_rng(self.seed).permutation(len(train))
            held = set(order[:self.val_size].tolist())
            return ([s for i, s in enumerate(train) if i not in held], [s for i, s in enumerate(train) if i in held],
                    test)
        return train, [], test


__all__ = [
    "ImageProcessor",
    "InstructCollator",
    "InstructDataModule",
    "InstructDataModuleBase",
    "InstructDataset",
    "InstructSample",
    "read_instruct_json",
    "write_instruct_json",
]
