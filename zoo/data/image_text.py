"""Image-text datamodules for contrastive training (LIMoE): real captions and class-name captions.

Batches are dicts:

- training: ``{"image": float32 [B, C, H, W], "text": int64 [B, L], "label": int64 [B]}`` - one caption per
  image (a random template / a random one of the image's captions, drawn anew every epoch);
- evaluation (val / test): the same, except that caption datasets give every caption of an image,
  ``"text": [B, K, L]`` with ``"num_captions": [B]`` (rows past it are all padding), for retrieval;
- extra training views for self-supervision (caption datamodules, off by default): ``image_views=2`` adds
  ``"image_view2" [B, C, H, W]``, a second, independently augmented view of the same photo, and ``text_views=2``
  adds ``"text_view2" [B, L]``, a different caption of the same photo (see :class:`ImageTextCSVDataModule`).

``label`` is the class id for class-caption data and the image's index for caption data (two items with the
same label are positives for ``ContrastiveTask(positives="labels")``).

Text is tokenized with open_clip's BPE tokenizer (:class:`CaptionTokenizer`; its vocabulary ships with the
open_clip package, so no download is needed): ``<start_of_text> ... <end_of_text>`` then padding id 0, cut to
``context_length`` (the end token is kept when truncating).

Datamodules (attributes read by :class:`zoo.tasks.contrastive.ContrastiveTask` / the model config:
``image_size``, ``in_chans``, ``context_length``, ``tokenizer``, and for zero-shot ``class_names`` +
``zero_shot_templates``):

- :class:`ClassCaptionDataModule`: MNIST / CIFAR-10 sprites / scikit-learn digits images (the image
  classification datamodules of :mod:`zoo.data.image_classification` load them) with captions made from the
  class name and caption templates. Training uses ``train_templates``; zero-shot evaluation uses a DISJOINT
  set of held-out templates (checked).
- :class:`ImageTextCSVDataModule`: a user's CSV of ``image,caption`` rows (several rows per image allowed),
  split BY IMAGE into train / test (seeded), images resized once and kept in memory.
- :class:`Flickr8kDataModule`: the shared Flickr8k 1k subset (``<data root>/flickr8k_1k_subset``: 1000
  photos x 5 human captions) via the CSV datamodule: 800 train / 200 test images, seeded.
"""

from __future__ import annotations

import csv
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.data.base import InMemoryImageDataset, LoaderArgs, SplitDataModule, check_positive_int, image_splits
from zoo.data.paths import find_dataset_dir, incomplete_dataset_error

PathLike = str | os.PathLike[str]
from zoo.data.prompts import (  # noqa: F401 (re-exported: the recipes and tests name them here)
    CIFAR10_HELDOUT_TEMPLATES,
    CIFAR10_TRAIN_TEMPLATES,
    DIGIT_WORDS,
    MNIST_HELDOUT_TEMPLATES,
    MNIST_TRAIN_TEMPLATES,
    check_templates,
)
from zoo.data.transforms import (  # noqa: F401 (re-exported)
    CLIP_MEAN,
    CLIP_STD,
    chain_augment,
    color_jitter_grayscale,
    random_resized_crop_flip,
)
from zoo.tokenizer import CaptionTokenizer  # noqa: F401 (re-exported)


# ------------------------------------------------------------------------------------ shared datamodule
class _ImageTextDataModule(SplitDataModule):
    """The attributes every image-text datamodule shares (see the module docstring); loaders, seeded shuffling
    and ``setup`` come from :class:`~zoo.data.base.SplitDataModule`."""

    image_size: int
    in_chans: int
    class_names: Optional[list[str]] = None
    zero_shot_templates: Optional[list[str]] = None
    drop_last_train = True  # contrastive batches: a small last batch has too few negatives

    def __init__(self, context_length: int, **loader: Any) -> None:
        super().__init__(**loader)
        self.context_length = check_positive_int("context_length", context_length, minimum=3)
        self.tokenizer = CaptionTokenizer(self.context_length)


# ---------------------------------------------------------------------------------- class captions
class ClassCaptionDataset(Dataset):
    """Images of a classification dataset, each paired with a caption ``template.format(class name)``.

    Every (class, template) caption is tokenized once: ``table [num_classes, T, L]``. ``train=True`` draws a
    random template per access (torch's global RNG, seeded by Lightning / the loader workers);
    ``train=False`` uses template ``i % T`` for item ``i`` (deterministic).
    """

    def __init__(self, images: Dataset, class_names: Sequence[str], templates: Sequence[str],
                 tokenizer: CaptionTokenizer, train: bool) -> None:
        self.images = images
        self.templates = list(templates)
        captions = [t.format(c) for c in class_names for t in self.templates]
        self.table = tokenizer(captions).reshape(len(class_names), len(self.templates), -1)
        self.train = train

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, label = self.images[i]
        T = len(self.templates)
        t = int(torch.randint(T, ())) if self.train else i % T
        return {"image": image, "text": self.table[int(label), t], "label": torch.as_tensor(label, dtype=torch.long)}


class ClassCaptionDataModule(_ImageTextDataModule):
    """Class-name captions for an image-classification dataset, for contrastive training + zero-shot eval.

    Args:
        dataset: "mnist", "cifar10_sprites" or "digits" (one of ``zoo.data.IMAGE_CLASSIFICATION_DATAMODULES``
            except "image_folder"); its datamodule loads the images and gives the train / val / test split.
        data_dir: data root (None: ``$ZOO_DATA``, then ``<repo>/../shared/data``; see :mod:`zoo.data.paths`).
        class_names: the words put into captions; default: digit words ("zero" .. "nine") for MNIST / digits,
            the dataset's class names otherwise.
        train_templates / zero_shot_templates: caption templates with one ``{}``; defaults per dataset
            (``MNIST_*`` / ``CIFAR10_*`` in this module). They must be disjoint: zero-shot accuracy is measured
            with templates never seen in training.
        context_length: text length in tokens.
        dataset_kwargs: extra arguments of the classification datamodule (e.g. ``val_size``, ``augment``).

    Val / test items carry captions from the held-out templates (for a val contrastive loss); the zero-shot
    classifier itself is built by the task from ``class_names`` x ``zero_shot_templates``.
    """

    loader_defaults = LoaderArgs(batch_size=128)

    def __init__(
        self,
        dataset: str = "mnist",
        data_dir: PathLike | None = None,
        context_length: int = 16,
        class_names: Optional[Sequence[str]] = None,
        train_templates: Optional[Sequence[str]] = None,
        zero_shot_templates: Optional[Sequence[str]] = None,
        dataset_kwargs: Optional[dict[str, Any]] = None,
        **loader: Any,
    ) -> None:
        super().__init__(context_length, **loader)
        from zoo.data import IMAGE_CLASSIFICATION_DATAMODULES

        choices = sorted(k for k in IMAGE_CLASSIFICATION_DATAMODULES if k != "image_folder")
        if dataset not in choices:
            raise ValueError(f"dataset must be one of {choices}, got {dataset!r} "
                             "(for your own photos with captions use ImageTextCSVDataModule)")
        kwargs = dict(dataset_kwargs or {})
        if dataset != "digits":
            kwargs.setdefault("data_dir", data_dir)
        self.source = IMAGE_CLASSIFICATION_DATAMODULES[dataset](batch_size=self.batch_size, seed=self.seed,
                                                                 **kwargs)
        self.dataset = dataset
        digit_like = dataset in ("mnist", "digits")
        self.class_names = list(class_names) if class_names is not None else (
            list(DIGIT_WORDS) if digit_like else list(self.source.class_names))
        if len(self.class_names) != self.source.num_classes:
            raise ValueError(f"{dataset} has {self.source.num_classes} classes, got {len(self.class_names)} class_names")
        default_train, default_heldout = ((MNIST_TRAIN_TEMPLATES, MNIST_HELDOUT_TEMPLATES) if digit_like
                                          else (CIFAR10_TRAIN_TEMPLATES, CIFAR10_HELDOUT_TEMPLATES))
        self.train_templates = list(train_templates) if train_templates is not None else list(default_train)
        self.zero_shot_templates = (list(zero_shot_templates) if zero_shot_templates is not None
                                    else list(default_heldout))
        check_templates(self.train_templates, self.zero_shot_templates)
        self.image_size = int(self.source.image_size)
        self.in_chans = int(self.source.in_chans)
        self.num_classes = int(self.source.num_classes)
        self.save_hyperparameters()

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        train, val, test = self.source.build_splits()
        return (ClassCaptionDataset(train, self.class_names, self.train_templates, self.tokenizer, train=True),
                ClassCaptionDataset(val, self.class_names, self.zero_shot_templates, self.tokenizer, train=False),
                ClassCaptionDataset(test, self.class_names, self.zero_shot_templates, self.tokenizer, train=False))


# ------------------------------------------------------------------------------------- real captions
def read_caption_csv(path: PathLike) -> "OrderedDict[str, list[str]]":
    """``image,caption`` CSV (header required) -> {image file name: [captions]} in first-seen order.

    Raises FileNotFoundError for a missing file and ValueError (naming the file and row) for a missing
    header column, an empty image name or caption, or a file without rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption CSV not found: {path}. It needs a header 'image,caption' and one row "
                                "per caption; several rows may share an image.")
    groups: OrderedDict[str, list[str]] = OrderedDict()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "image" not in fields or "caption" not in fields:
            raise ValueError(f"{path}: header must have columns 'image' and 'caption', got {fields}")
        reader.fieldnames = fields
        for row_no, row in enumerate(reader, start=2):
            image, caption = (row.get("image") or "").strip(), (row.get("caption") or "").strip()
            if not image or not caption:
                raise ValueError(f"{path} line {row_no}: empty image name or caption ({row})")
            groups.setdefault(image, []).append(caption)
    if not groups:
        raise ValueError(f"{path} has a header but no rows")
    return groups


def load_images(paths: Sequence[Path], image_size: int) -> torch.Tensor:
    """Decode, resize the shorter side to ``image_size`` and centre-crop: -> uint8 [N, 3, S, S]."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as img:
                img = img.convert("RGB")
                w, h = img.size
                scale = image_size / min(w, h)
                nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
                img = img.resize((nw, nh), Image.BICUBIC)
                left, top = (nw - image_size) // 2, (nh - image_size) // 2
                img = img.crop((left, top, left + image_size, top + image_size))
                out[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {p}: {type(err).__name__}: {err}") from err
    return torch.from_numpy(out)


class CaptionedImageDataset(Dataset):
    """Images (an :class:`InMemoryImageDataset` whose labels are image indices) with their tokenized captions.

    ``captions [N_images, K, L]`` (rows past ``num_captions[i]`` are padding). ``train=True``: one random
    caption of the image per access, ``"text" [L]``; ``train=False`` or ``all_captions=True``: all of them,
    ``"text" [K, L]`` and ``"num_captions"``.

    Extra views (training split only): ``image_view2`` (an :class:`InMemoryImageDataset` over the same rows as
    ``images``, with its own augmentation) adds ``"image_view2"``, the same photo augmented again independently;
    ``text_views=2`` adds ``"text_view2" [L]``, a caption of the same photo other than ``"text"`` (drawn
    uniformly among the others; the same caption when the photo has only one). Random draws per item, in this
    order: the image's augmentation, the caption, the second view's augmentation, the second caption.
    """

    def __init__(self, images: InMemoryImageDataset, captions: torch.Tensor, num_captions: torch.Tensor,
                 train: bool, all_captions: bool = False, image_view2: Optional[InMemoryImageDataset] = None,
                 text_views: int = 1) -> None:
        self.images, self.captions, self.num_captions = images, captions, num_captions
        self.train = train and not all_captions
        if image_view2 is not None and (not train or len(image_view2) != len(images)):
            raise ValueError("image_view2 is for the training split and must cover the same rows as images")
        if text_views not in (1, 2) or (text_views == 2 and not self.train):
            raise ValueError("text_views=2 needs a training split with one caption per item (train_all_captions off)")
        self.image_view2, self.text_views = image_view2, text_views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, index = self.images[i]
        row = int(index)
        n = int(self.num_captions[row])
        if self.train:
            c = int(torch.randint(n, ()))
            item = {"image": image, "text": self.captions[row, c], "label": index}
        else:
            item = {"image": image, "text": self.captions[row], "label": index,
                    "num_captions": torch.as_tensor(n, dtype=torch.long)}
        if self.image_view2 is not None:
            item["image_view2"] = self.image_view2[i][0]
        if self.text_views == 2:
            c2 = (c + 1 + int(torch.randint(n - 1, ()))) % n if n > 1 else c
            item["text_view2"] = self.captions[row, c2]
        return item


class ImageTextCSVDataModule(_ImageTextDataModule):
    """A CSV of ``image,caption`` rows + an image folder, split BY IMAGE (seeded) into train and test.

    Args:
        csv_path: the CSV (header ``image,caption``; an image may have several rows).
        image_root: folder the ``image`` column is relative to; default: ``<csv folder>/images`` if it
            exists, else the CSV's folder.
        image_size: images are resized (shorter side) and centre-cropped to this once, kept in memory as uint8.
        num_train / num_test: images per split (ints) - together at most the number of images; None for
            ``num_test`` = all images not in train; None for ``num_train`` = 80 % of the images.
        num_val: images held out of train for validation; 0 = validate on the test split (monitoring only;
            nothing is selected on it).
        augment: random resized crop (area ``crop_scale``, aspect 3/4..4/3) + horizontal flip on train images.
        crop_scale: the area range of the random crop.
        train_all_captions: training items carry ALL captions of the image (``"text" [K, L]``; the task then
            uses every caption as a positive of its image in one step) instead of one random caption.
        max_captions: captions kept per image (first ones); None = all (eval pads to the largest count).
        mean, std: normalisation (default CLIP's).
        image_views: 2 adds ``"image_view2" [B, C, H, W]`` to training batches: the same photo augmented again,
            independently (the same crop / flip as ``"image"`` when ``augment``, then the colour distortion of
            ``view_color_jitter``); for SimCLR-style self-supervision (``ContrastiveTask(image_ssl_weight>0)``,
            SLIP). With ``augment=False`` and no colour jitter the two views are equal. 1 (default) = off.
        view_color_jitter: strength ``s`` of SimCLR's colour distortion (:func:`color_jitter_grayscale`) applied
            to the second view only (the first view also feeds the image-text loss, which is left as it is);
            0 (default) = none.
        text_views: 2 adds ``"text_view2" [B, L]`` to training batches: a different caption of the same photo
            (for text-text self-supervision, ``ContrastiveTask(text_ssl_weight>0)``); needs
            ``train_all_captions`` off. 1 (default) = off.

    Validation and test batches never carry extra views.
    """

    def __init__(
        self,
        csv_path: PathLike = "captions.csv",
        image_root: PathLike | None = None,
        image_size: int = 64,
        context_length: int = 32,
        num_train: Optional[int] = None,
        num_test: Optional[int] = None,
        num_val: int = 0,
        augment: bool = True,
        crop_scale: Sequence[float] = (0.5, 1.0),
        train_all_captions: bool = False,
        max_captions: Optional[int] = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        image_views: int = 1,
        view_color_jitter: float = 0.0,
        text_views: int = 1,
        **loader: Any,
    ) -> None:
        super().__init__(context_length, **loader)
        self.csv_path = csv_path
        self.image_root = image_root
        self.image_size = check_positive_int("image_size", image_size, minimum=4)
        self.in_chans = 3
        self.num_train, self.num_test = num_train, num_test
        self.num_val = check_positive_int("num_val", num_val, minimum=0)
        self.augment = bool(augment)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.train_all_captions = bool(train_all_captions)
        self.max_captions = max_captions
        self.mean, self.std = tuple(mean), tuple(std)
        for name, views in (("image_views", image_views), ("text_views", text_views)):
            if check_positive_int(name, views) > 2:
                raise ValueError(f"{name} must be 1 or 2, got {views}")
        self.image_views, self.text_views = int(image_views), int(text_views)
        if self.text_views == 2 and self.train_all_captions:
            raise ValueError("text_views=2 draws two captions per image; with train_all_captions=True every caption "
                             "is already in the batch: turn one of them off")
        self.view_color_jitter = float(view_color_jitter)
        if self.view_color_jitter < 0:
            raise ValueError(f"view_color_jitter must be >= 0, got {view_color_jitter}")
        if self.view_color_jitter > 0 and self.image_views < 2:
            raise ValueError("view_color_jitter applies to the second image view: set image_views=2 as well")
        self.image_names: list[str] = []
        self.split_indices: dict[str, np.ndarray] = {}
        self.save_hyperparameters()

    def resolve_paths(self) -> tuple[Path, Path]:
        """(CSV file, image folder); FileNotFoundError when either is missing."""
        csv_file = Path(self.csv_path).expanduser()
        if not csv_file.is_file():
            raise FileNotFoundError(f"caption CSV not found: {csv_file}. Pass csv_path (CLI: --data.csv_path).")
        if self.image_root is not None:
            root = Path(self.image_root).expanduser()
        else:
            root = csv_file.parent / "images" if (csv_file.parent / "images").is_dir() else csv_file.parent
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}. Pass image_root (CLI: --data.image_root).")
        return csv_file, root

    def _split_counts(self, n: int) -> tuple[int, int]:
        n_train = int(round(0.8 * n)) if self.num_train is None else int(self.num_train)
        n_test = n - n_train if self.num_test is None else int(self.num_test)
        if n_train < 1 or n_test < 1 or n_train + n_test > n:
            raise ValueError(f"num_train={self.num_train} / num_test={self.num_test} do not fit the {n} images "
                             "of the CSV (need >= 1 each and at most the total)")
        if self.num_val >= n_train:
            raise ValueError(f"num_val={self.num_val} must be smaller than the {n_train} train images")
        return n_train, n_test

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        csv_file, root = self.resolve_paths()
        groups = read_caption_csv(csv_file)
        names = list(groups)
        paths = [root / name for name in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise FileNotFoundError(f"{len(missing)} image(s) named in {csv_file} are missing under {root}: "
                                    f"{', '.join(missing[:5])}{more}")
        n_train, n_test = self._split_counts(len(names))
        order = np.random.default_rng(self.seed).permutation(len(names))
        train_idx, test_idx = np.sort(order[:n_train]), np.sort(order[n_train:n_train + n_test])
        val_idx = test_idx
        if self.num_val:
            perm = np.random.default_rng(self.seed + 1).permutation(train_idx)
            val_idx, train_idx = np.sort(perm[:self.num_val]), np.sort(perm[self.num_val:])
        self.image_names = names
        self.split_indices = {"train": train_idx, "val": val_idx, "test": test_idx}
        K = max(len(c) for c in groups.values())
        if self.max_captions is not None:
            K = min(K, check_positive_int("max_captions", self.max_captions))
        counts = torch.tensor([min(len(groups[n]), K) for n in names])
        flat = [c for n in names for c in (groups[n][:K] + [""] * (K - min(len(groups[n]), K)))]
        captions = self.tokenizer(flat).reshape(len(names), K, -1)
        captions[torch.arange(K).expand(len(names), K) >= counts[:, None]] = self.tokenizer.pad_token_id
        used = np.concatenate([train_idx, val_idx, test_idx])
        keep = np.zeros(len(names), dtype=bool)
        keep[used] = True
        pixels = torch.zeros(len(names), 3, self.image_size, self.image_size, dtype=torch.uint8)
        pixels[torch.from_numpy(keep)] = load_images([paths[i] for i in np.flatnonzero(keep)], self.image_size)
        ids = torch.arange(len(names))
        augment = random_resized_crop_flip(self.crop_scale) if self.augment else None
        train, val, test = image_splits(pixels, ids, self.mean, self.std, 255.0, train_idx, [val_idx, test_idx],
                                        augment)
        view2 = None
        if self.image_views == 2:
            colour = color_jitter_grayscale(self.view_color_jitter) if self.view_color_jitter > 0 else None
            view2 = InMemoryImageDataset(pixels, ids, self.mean, self.std, 255.0, indices=train_idx,
                                         augment=chain_augment(augment, colour))
        return (CaptionedImageDataset(train, captions, counts, True, self.train_all_captions, view2,
                                      self.text_views),
                CaptionedImageDataset(val, captions, counts, False, self.train_all_captions),
                CaptionedImageDataset(test, captions, counts, False, self.train_all_captions))


class Flickr8kDataModule(ImageTextCSVDataModule):
    """The shared Flickr8k 1k subset: ``<data root>/flickr8k_1k_subset/{captions.txt, images/}``, 1000 photos
    with 5 human captions each, split by image into ``num_train`` (800) / ``num_test`` (200), seeded.

    Args:
        data_dir: data root (or the subset folder itself); None -> ``$ZOO_DATA``, then
            ``<repo root>/../shared/data`` (see :mod:`zoo.data.paths`).
        Other arguments as :class:`ImageTextCSVDataModule`.
    """

    FOLDER = "flickr8k_1k_subset"
    CAPTIONS = "captions.txt"

    def __init__(
        self,
        data_dir: PathLike | None = None,
        image_size: int = 64,
        context_length: int = 32,
        num_train: int = 800,
        num_test: int = 200,
        num_val: int = 0,
        augment: bool = True,
        crop_scale: Sequence[float] = (0.5, 1.0),
        train_all_captions: bool = False,
        image_views: int = 1,
        view_color_jitter: float = 0.0,
        text_views: int = 1,
        **loader: Any,
    ) -> None:
        super().__init__(csv_path=self.CAPTIONS, image_root=None, image_size=image_size,
                         context_length=context_length, num_train=num_train, num_test=num_test, num_val=num_val,
                         augment=augment, crop_scale=crop_scale, train_all_captions=train_all_captions,
                         image_views=image_views, view_color_jitter=view_color_jitter, text_views=text_views,
                         **loader)
        self.data_dir = data_dir
        self.save_hyperparameters()

    def resolve_paths(self) -> tuple[Path, Path]:
        folder = find_dataset_dir(self.FOLDER, self.data_dir, marker_files=[self.CAPTIONS])
        csv_file, images = folder / self.CAPTIONS, folder / "images"
        missing = [p.name for p in (csv_file, images) if not p.exists()]
        if missing:
            raise incomplete_dataset_error("Flickr8k", folder, missing, "captions.txt (CSV image,caption) and images/")
        return csv_file, images


# ------------------------------------------------------------------------------------------ mixtures
class LabelOffsetDataset(Dataset):
    """Items of ``base`` with ``"label" + offset``: keeps the label spaces of mixed sources apart."""

    def __init__(self, base: Dataset, offset: int) -> None:
        self.base, self.offset = base, int(offset)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.base[i])
        item["label"] = item["label"] + self.offset
        return item


class MixedImageTextDataModule(_ImageTextDataModule):
    """Train on ``main``'s train split plus the TRAIN splits of ``extra`` image-text datamodules; validate and
    test on ``main`` only (its val / test splits, zero-shot classes and templates).

    Why: 800 Flickr8k photos are few for contrastive training from scratch; more real image-text pairs in the
    same run (e.g. CIFAR-10 photos with class-name captions) give the shared transformer more to learn from,
    while the reported numbers stay those of ``main``'s test split.

    Args:
        main: the datamodule evaluated on; its attributes (``image_size``, ``in_chans``, ``context_length``,
            ``class_names``, ``zero_shot_templates``) are this module's.
        extra: datamodules whose train splits are added; they must give the same image size, channels and
            context length as ``main`` (their own val / test splits are not used).
        main_repeats: ``main``'s train split appears this many times per epoch, to balance a small main set
            against large extras (1 = plain concatenation).
        batch_size / num_workers / seed / pin_memory / persistent_workers (:class:`~zoo.data.base.LoaderArgs`):
            the loaders of the mixture (the sources' own values only
            decide their splits).

    Labels: source ``s`` (0 = main) has its labels shifted by ``s * LABEL_STRIDE``, so with
    ``ContrastiveTask(positives="labels")`` a Flickr8k caption stays a positive of its own photo only, and a
    class caption a positive of every image of that class in the batch, never across sources. Each source
    keeps its own normalisation (CIFAR-10 and CLIP's statistics differ by < 0.04).
    """

    LABEL_STRIDE = 10**9

    def __init__(
        self,
        main: _ImageTextDataModule,
        extra: Sequence[_ImageTextDataModule] = (),
        main_repeats: int = 1,
        **loader: Any,
    ) -> None:
        super().__init__(main.context_length, **loader)
        self.main, self.extra = main, list(extra)
        self.main_repeats = check_positive_int("main_repeats", main_repeats)
        for i, dm in enumerate(self.extra):
            theirs = (int(dm.image_size), int(dm.in_chans), int(dm.context_length))
            ours = (int(main.image_size), int(main.in_chans), int(main.context_length))
            if theirs != ours:
                raise ValueError(
                    f"extra[{i}] ({type(dm).__name__}) gives image_size, in_chans, context_length = {theirs}, "
                    f"main ({type(main).__name__}) gives {ours}: set the extra datamodule's arguments to match")
        if self.extra and getattr(main, "train_all_captions", False):
            raise ValueError("main.train_all_captions=True gives [K, L] captions per item, extras give one: "
                             "turn train_all_captions off to mix in extra datasets")
        if self.extra and (getattr(main, "image_views", 1) > 1 or getattr(main, "text_views", 1) > 1):
            raise ValueError("main gives extra training views (image_views / text_views = 2), the extra datasets do "
                             "not: set them to 1 to mix in extra datasets")
        self.image_size, self.in_chans = int(main.image_size), int(main.in_chans)
        self.class_names = main.class_names
        self.zero_shot_templates = main.zero_shot_templates
        self.save_hyperparameters(ignore=["main", "extra"])

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        from torch.utils.data import ConcatDataset

        main_train, val, test = self.main.build_splits()
        parts: list[Dataset] = [main_train] * self.main_repeats
        for s, dm in enumerate(self.extra, start=1):
            parts.append(LabelOffsetDataset(dm.build_splits()[0], s * self.LABEL_STRIDE))
        return ConcatDataset(parts), val, test
