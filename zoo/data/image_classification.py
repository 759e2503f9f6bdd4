"""Image-classification datamodules: scikit-learn digits, MNIST (IDX), CIFAR-10 (ConvNetJS sprites), ImageFolder.

All yield ``(images float32 [B, C, H, W] normalised, labels int64 [B])`` and expose ``num_classes``,
``class_names``, ``image_size``, ``in_chans``, ``mean`` and ``std`` (see :class:`ImageClassificationDataModule`).

Splits (``seed`` only moves the val hold-out, never the test split):

=================  ============  ==========  =============================================
datamodule         train         val         test
=================  ============  ==========  =============================================
Digits             1257          180         360 (fixed stratified 20 % of the 1797)
MNIST              55000         5000        10000 (official t10k)
CIFAR10Sprite      3500          500         1000 (official test images 0..999)
ImageFolder        root/train    root/val    root/test (else carved from one tree)
=================  ============  ==========  =============================================
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.data.base import (
    ImageClassificationDataModule,
    LoaderArgs,
    carve_splits,
    check_positive_int,
    holdout_image_splits,
    image_splits,
    random_crop_flip,
    val_holdout,
)
from zoo.data.download import CIFAR10_TORCHVISION_DIR, cifar10_folder, mnist_folder, read_cifar10_batches
from zoo.data.paths import find_dataset_dir, incomplete_dataset_error
from zoo.data.readers import (
    CIFAR_SPRITE_ROWS,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    read_cifar_sprite,
    read_convnetjs_labels,
    read_idx,
)

PathLike = str | os.PathLike[str]

DIGIT_CLASS_NAMES: list[str] = [str(d) for d in range(10)]
CIFAR10_CLASS_NAMES: list[str] = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


class DigitsDataModule(ImageClassificationDataModule):
    """scikit-learn's ``load_digits``: 1797 grayscale 8x8 digits, pixel values 0..16, 10 classes. Needs no files.

    Split: a fixed stratified test split of ``test_size`` (default 360, seed-independent so test accuracy is
    comparable across seeds), then a stratified val hold-out of ``val_size`` (default 180) from the rest, seeded
    by ``seed``; train keeps 1257. Everything lives in memory as one float tensor (~0.5 MB at 8x8).

    ``image_size`` defaults to 8, the native resolution: a ViT with patch size 2 then sees 4x4 = 16 tokens per
    image, small enough to train in seconds on a CPU while every token still carries real (not interpolated)
    pixels. Larger values bilinearly upsample once at setup (e.g. 16 -> 64
    tokens with patch 2) when a model needs more tokens per image; this adds no information.

    ``mean``/``std`` (0.3053 / 0.3760) are the statistics of all 1797 images scaled to [0, 1].
    """

    num_classes = 10
    class_names = DIGIT_CLASS_NAMES
    in_chans = 1
    mean = (0.3053,)
    std = (0.3760,)
    NATIVE_SIZE = 8
    PIXEL_MAX = 16.0

    def __init__(
        self,
        image_size: int = 8,
        val_size: int | float = 180,
        test_size: int | float = 360,
        **loader: Any,
    ) -> None:
        super().__init__(**loader)
        self.image_size = check_positive_int("image_size", image_size, minimum=self.NATIVE_SIZE)
        self.val_size = val_size
        self.test_size = test_size
        self.save_hyperparameters()

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / self.PIXEL_MAX).unsqueeze(1)  # [N, 1, 8, 8]
        labels = torch.from_numpy(digits.target.astype(np.int64))
        if self.image_size != self.NATIVE_SIZE:
            images = torch.nn.functional.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            ).clamp_(0.0, 1.0)
        train_idx, val_idx, test_idx = carve_splits(digits.target, self.test_size, self.val_size, self.seed)
        train, val, test = image_splits(images, labels, self.mean, self.std, 1.0, train_idx, [val_idx, test_idx])
        return train, val, test


class MNISTDataModule(ImageClassificationDataModule):
    """MNIST from the four original IDX files in ``<data root>/mnist/`` (gzip + numpy; no downloads).

    Files: ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
    ``t10k-labels-idx1-ubyte.gz`` (the same names without ``.gz`` are accepted too). Magic numbers, header sizes,
    28x28 images, matching image/label counts and labels 0..9 are checked.

    Split: 60000 official train -> ``val_size`` (default 5000) stratified, seeded hold-out for val, 55000 train;
    test = the official 10000. Images stay uint8 in memory (~55 MB) and are normalised per sample with the
    usual MNIST statistics ``mean = 0.1307``, ``std = 0.3081``.

    Args:
        data_dir: the data root holding ``mnist/`` (or the mnist folder itself); None -> ``$ZOO_DATA``, then
            ``<repo root>/../shared/data``, then ``./data``.
        augment: random translation of train images by up to 2 pixels (zero padding 2 + random 28x28 crop;
            no flips: they change digits). Val/test are never augmented.
        download: when no ``mnist/`` folder is found, also read torchvision's ``<data root>/MNIST/raw`` and, if
            that is absent too, download it there with torchvision (see :mod:`zoo.data.download`).
    """

    num_classes = 10
    class_names = DIGIT_CLASS_NAMES
    image_size = 28
    in_chans = 1
    mean = (0.1307,)
    std = (0.3081,)
    FOLDER = "mnist"
    FILES = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }

    loader_defaults = LoaderArgs(batch_size=128)

    def __init__(
        self,
        data_dir: PathLike | None = None,
        val_size: int | float = 5000,
        augment: bool = False,
        download: bool = False,
        **loader: Any,
    ) -> None:
        super().__init__(**loader)
        self.data_dir = data_dir
        self.val_size = val_size
        self.augment = bool(augment)
        self.download = bool(download)
        self.save_hyperparameters()

    def find_files(self) -> dict[str, Path]:
        """Paths of the four IDX files; raises FileNotFoundError naming the folder and the missing files."""
        try:
            folder = find_dataset_dir(self.FOLDER, self.data_dir, marker_files=[self.FILES["train_images"] + ".gz"])
        except FileNotFoundError as err:  # torchvision's layout, a download, or how to get it (zoo/data/download.py)
            folder = mnist_folder(self.data_dir, self.download, err)
        found: dict[str, Path] = {}
        missing: list[str] = []
        for key, name in self.FILES.items():
            for candidate in (folder / f"{name}.gz", folder / name):
                if candidate.is_file():
                    found[key] = candidate
                    break
            else:
                missing.append(f"{name}.gz")
        if missing:
            names = ", ".join(n + ".gz" for n in self.FILES.values())
            raise incomplete_dataset_error("MNIST", folder, missing, f"the 4 original IDX files ({names})")
        return found

    @classmethod
    def load_split(cls, images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one image/label IDX pair -> ``(images uint8 [N, 1, 28, 28], labels int64 [N])``, validated."""
        images = read_idx(images_path, expected_magic=IDX_IMAGES_MAGIC)
        labels = read_idx(labels_path, expected_magic=IDX_LABELS_MAGIC)
        if images.shape[1:] != (cls.image_size, cls.image_size):
            raise ValueError(f"{images_path}: images are {images.shape[1:]}, expected 28x28 for MNIST")
        if len(images) != len(labels):
            raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
        if labels.size and labels.max() >= cls.num_classes:
            raise ValueError(f"{labels_path}: label {labels.max()} out of range 0..9")
        # frombuffer arrays are read-only; copy so torch owns writable memory.
        return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        files = self.find_files()
        train_x, train_y = self.load_split(files["train_images"], files["train_labels"])
        test_x, test_y = self.load_split(files["test_images"], files["test_labels"])
        augment = random_crop_flip(padding=2, flip=False) if self.augment else None
        return holdout_image_splits(train_x, train_y, test_x, test_y, self.mean, self.std, 255.0, self.val_size,
                                    self.seed, augment)


class CIFAR10SpriteDataModule(ImageClassificationDataModule):
    """The CIFAR-10 subset stored as ConvNetJS PNG sprites in ``<data root>/cifar10_convnetjs_subset/``.

    ``cifar10_batch_k.png`` (k < 50) holds official train images 1000k..1000k+999, ``cifar10_batch_50.png`` the
    official test images 0..999; ``cifar10_labels.js`` has 51000 labels (50000 train, then test 0..999). Each
    sprite row is one 32x32 RGB image with pixel (y, x) at column 32*y + x.

    Split: the train batches (default 0-3 = 4000 images) -> stratified, seeded ``val_size`` hold-out (default
    500) for val, 3500 train; test = the 1000 official test images. Normalised with the CIFAR-10 train-set
    statistics mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616).

    Args:
        data_dir: the data root holding ``cifar10_convnetjs_subset/`` (or that folder itself); None -> ``$ZOO_DATA``,
            then ``<repo root>/../shared/data``, then ``./data``.
        augment: random crop (zero padding 4) + horizontal flip on train images; val/test are never augmented.
        train_batches: which train sprites to load (only 0-3 exist in the shared copy).
        download: when no sprite folder is found, also read torchvision's ``<data root>/cifar-10-batches-py`` (the
            same images: train "batch" k = official train images 1000k..1000k+999, test = test images 0..999;
            there every k in 0..49 exists) and, if that is absent too, download it with torchvision.
    """

    num_classes = 10
    class_names = CIFAR10_CLASS_NAMES
    image_size = 32
    in_chans = 3
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    FOLDER = "cifar10_convnetjs_subset"
    LABELS_FILE = "cifar10_labels.js"
    TEST_BATCH = 50
    NUM_TRAIN_IMAGES = 50000  # official train labels come first in the labels file

    loader_defaults = LoaderArgs(batch_size=128)

    def __init__(
        self,
        data_dir: PathLike | None = None,
        val_size: int | float = 500,
        augment: bool = False,
        train_batches: Sequence[int] = (0, 1, 2, 3),
        download: bool = False,
        **loader: Any,
    ) -> None:
        super().__init__(**loader)
        self.data_dir = data_dir
        self.download = bool(download)
        self.val_size = val_size
        self.augment = bool(augment)
        batches = [int(b) for b in train_batches]
        if not batches or any(not 0 <= b < self.TEST_BATCH for b in batches) or len(set(batches)) != len(batches):
            raise ValueError(f"train_batches must be distinct sprite numbers in 0..49, got {list(train_batches)}")
        self.train_batches = batches
        self.save_hyperparameters()

    def sprite_path(self, folder: Path, batch: int) -> Path:
        return folder / f"cifar10_batch_{batch}.png"

    def find_folder(self) -> Path:
        """The sprite folder, checked for the labels file and every needed sprite."""
        try:
            folder = find_dataset_dir(self.FOLDER, self.data_dir, marker_files=[self.LABELS_FILE])
        except FileNotFoundError as err:  # torchvision's layout, a download, or how to get it (zoo/data/download.py)
            return cifar10_folder(self.data_dir, self.download, err)
        needed = [folder / self.LABELS_FILE] + [
            self.sprite_path(folder, b) for b in [*self.train_batches, self.TEST_BATCH]
        ]
        missing = [p.name for p in needed if not p.is_file()]
        if missing:
            raise incomplete_dataset_error(
                "CIFAR-10 sprite", folder, missing,
                f"{self.LABELS_FILE} and cifar10_batch_<k>.png for k in {self.train_batches + [self.TEST_BATCH]}")
        return folder

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        folder = self.find_folder()
        augment = random_crop_flip(padding=4) if self.augment else None
        if folder.name == CIFAR10_TORCHVISION_DIR:
            train_x, train_y, test_x, test_y = map(torch.from_numpy, read_cifar10_batches(folder, self.train_batches))
            return holdout_image_splits(train_x, train_y, test_x, test_y, self.mean, self.std, 255.0, self.val_size,
                                        self.seed, augment)
        labels_path = folder / self.LABELS_FILE
        all_labels = read_convnetjs_labels(labels_path, num_classes=self.num_classes)
        needed = self.NUM_TRAIN_IMAGES + CIFAR_SPRITE_ROWS
        if len(all_labels) < needed:
            raise ValueError(
                f"Corrupt data file {labels_path}: {len(all_labels)} labels, expected {needed} "
                "(50000 train then 1000 test)"
            )

        def batch_labels(batch: int) -> np.ndarray:
            start = (self.NUM_TRAIN_IMAGES if batch == self.TEST_BATCH else batch * CIFAR_SPRITE_ROWS)
            return all_labels[start : start + CIFAR_SPRITE_ROWS]

        train_x = torch.from_numpy(
            np.concatenate([read_cifar_sprite(self.sprite_path(folder, b)) for b in self.train_batches])
        )
        train_y = torch.from_numpy(np.concatenate([batch_labels(b) for b in self.train_batches]))
        test_x = torch.from_numpy(read_cifar_sprite(self.sprite_path(folder, self.TEST_BATCH)))
        test_y = torch.from_numpy(batch_labels(self.TEST_BATCH).copy())
        return holdout_image_splits(train_x, train_y, test_x, test_y, self.mean, self.std, 255.0, self.val_size,
                                    self.seed, augment)


class UnreadableImageError(ValueError):
    """An image file of the dataset cannot be decoded (truncated, corrupt, not an image)."""


def readable_samples(samples: Sequence[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[str]]:
    """``(readable, unreadable paths)``: each ``(path, label)`` of ``samples`` decoded once with PIL."""
    from PIL import Image

    good, bad = [], []
    for path, label in samples:
        try:
            with Image.open(path) as img:
                img.load()
            good.append((path, label))
        except (OSError, ValueError, SyntaxError):
            bad.append(path)
    return good, bad


class _TransformedSubset(Dataset):
    """Rows ``indices`` of an ImageFolder that returns PIL images, each passed through ``transform``."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform) -> None:  # noqa: ANN001 (torchvision)
        self.base = base
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.indices[i]
        try:
            image, label = self.base[row]
        except (OSError, ValueError, SyntaxError) as err:  # PIL: truncated / corrupt / not an image
            path = self.base.samples[row][0] if hasattr(self.base, "samples") else f"row {row}"
            raise UnreadableImageError(
                f"cannot read image {path}: {type(err).__name__}: {err}. Remove or replace the file, or pass "
                "skip_unreadable=True (--data.skip_unreadable true) to skip unreadable images at setup") from err
        return self.transform(image), torch.tensor(label, dtype=torch.int64)

    @property
    def targets(self) -> torch.Tensor:
        """Labels of this split in order, ``[len(self)]`` int64."""
        all_targets = self.base.targets  # type: ignore[attr-defined]
        return torch.tensor([all_targets[i] for i in self.indices], dtype=torch.int64)


class ImageFolderDataModule(ImageClassificationDataModule):
    """Any torchvision ``ImageFolder`` tree (``<root>/<class>/<image>``) resized to ``image_size``.

    Layouts:

    - ``root/train`` + ``root/val`` + ``root/test``: used as given.
    - ``root/train`` + ``root/val`` only: val is also the test split (the usual ImageNet-style release).
    - ``root/train`` + ``root/test`` only: val = seeded stratified ``val_size`` hold-out of train.
    - a single tree (no ``root/train``): test = a fixed (seed-independent) ``test_size`` hold-out, then val =
      a seeded ``val_size`` hold-out of the rest. Sizes are counts (int) or fractions (float in (0, 1)).

    Every split folder must have the same class folders. Images are resized (short side) and center-cropped to
    ``image_size``, converted to RGB (``in_chans=3``) or grayscale (``in_chans=1``), and normalised with ``mean``/
    ``std`` (default: ImageNet statistics; grayscale uses their channel average 0.449 / 0.226).
    ``augment`` adds a random crop (padding image_size // 8) + horizontal flip to train images.

    Checked at setup: at least 2 classes, no class folder without images. An image that cannot be decoded
    (truncated JPEG, ...) fails with an error naming the file; ``skip_unreadable=True`` instead decodes every image
    once at setup and leaves the unreadable ones out (their paths: ``skipped_images``, counted in a warning).

    ``class_names``/``num_classes`` scan the class folders on first access, so ``root`` must exist by then.
    """

    IMAGENET_MEAN = (0.485, 0.456, 0.406)
    IMAGENET_STD = (0.229, 0.224, 0.225)
    GRAY_MEAN = (0.449,)
    GRAY_STD = (0.226,)

    def __init__(
        self,
        root: PathLike,
        image_size: int,
        in_chans: int = 3,
        val_size: int | float = 0.1,
        test_size: int | float = 0.2,
        augment: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        skip_unreadable: bool = False,
        **loader: Any,
    ) -> None:
        super().__init__(**loader)
        self.root = Path(root).expanduser()
        self.skip_unreadable = bool(skip_unreadable)
        self.skipped_images: list[str] = []  # unreadable files left out at setup (skip_unreadable=True)
        self.image_size = check_positive_int("image_size", image_size)
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans!r}")
        self.in_chans = in_chans
        default_mean, default_std = (self.GRAY_MEAN, self.GRAY_STD) if in_chans == 1 else (
            self.IMAGENET_MEAN, self.IMAGENET_STD
        )
        self.mean = tuple(float(m) for m in (default_mean if mean is None else mean))
        self.std = tuple(float(s) for s in (default_std if std is None else std))
        if len(self.mean) != in_chans or len(self.std) != in_chans:
            raise ValueError(f"mean and std need {in_chans} values (in_chans), got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        self.val_size = val_size
        self.test_size = test_size
        self.augment = bool(augment)
        self._class_names: list[str] | None = None
        self.save_hyperparameters()

    # -- layout -------------------------------------------------------------------------------------------------
    def split_dirs(self) -> dict[str, Path]:
        """The split folders found: keys among "train", "val", "test"; just {"all": root} for a single tree."""
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"ImageFolder root not found: {self.root} (absolute: {self.root.resolve()}). "
                "Pass root (CLI: --data.root) pointing at a folder of class sub-folders, or at one holding "
                "train/ and val/ or test/."
            )
        train = self.root / "train"
        if not train.is_dir():
            return {"all": self.root}
        dirs = {"train": train}
        for name in ("val", "test"):
            if (self.root / name).is_dir():
                dirs[name] = self.root / name
        if len(dirs) == 1:
            # A lone train/ is still a valid single tree to carve val and test from.
            return {"all": train}
        return dirs

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        if self._class_names is None:
            from torchvision.datasets.folder import find_classes

            first = next(iter(self.split_dirs().values()))
            try:
                self._class_names = list(find_classes(str(first))[0])
            except FileNotFoundError as err:
                raise self._no_images_error(first, err) from err
        return self._class_names

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.class_names)

    def _no_images_error(self, folder: Path, err: Exception) -> FileNotFoundError:
        empty = re.search(r"no valid file for the classes (.+?)\. Supported", str(err))
        empty_classes = set(empty.group(1).split(", ")) if empty else set()
        if empty and empty_classes != set(self.class_names):  # some classes have images, these have none
            return FileNotFoundError(
                f"class folder(s) {empty.group(1)} of ImageFolder tree {folder} hold no images; every class "
                f"sub-folder needs image files (.jpg .jpeg .png .bmp .webp ...): add images or remove the folder")
        return FileNotFoundError(
            f"No images found under ImageFolder tree {folder}: expected one sub-folder per class holding image "
            f"files, e.g. {folder}/<class>/0001.png (.jpg .jpeg .png .bmp .webp ...). torchvision said: {err}"
        )

    def _open(self, folder: Path):  # noqa: ANN202 (torchvision ImageFolder)
        from torchvision.datasets import ImageFolder

        try:
            dataset = ImageFolder(str(folder))
        except FileNotFoundError as err:
            raise self._no_images_error(folder, err) from err
        if dataset.classes != self.class_names:
            raise ValueError(
                f"Class folders of {folder} ({dataset.classes}) differ from those of the training split "
                f"({self.class_names}); every split folder needs the same class sub-folders."
            )
        if len(dataset.classes) < 2:
            raise ValueError(f"ImageFolder tree {folder} has {len(dataset.classes)} class folder(s) "
                             f"({dataset.classes}); classification needs at least 2: one sub-folder per class")
        if self.skip_unreadable:
            good, bad = readable_samples(dataset.samples)
            if bad:
                import warnings

                warnings.warn(f"{folder}: skipped {len(bad)} unreadable image(s) of {len(dataset.samples)}, "
                              f"e.g. {bad[0]}", stacklevel=2)
                self.skipped_images += bad
                dataset.samples = dataset.imgs = good
                dataset.targets = [label for _, label in good]
        return dataset

    # -- transforms ---------------------------------------------------------------------------------------------
    def _transform(self, train: bool):  # noqa: ANN202 (torchvision transform)
        from torchvision import transforms as T

        steps: list = [T.Resize(self.image_size), T.CenterCrop(self.image_size)]
        if self.in_chans == 1:
            steps.append(T.Grayscale(num_output_channels=1))
        if train and self.augment:
            steps += [T.RandomCrop(self.image_size, padding=max(1, self.image_size // 8)), T.RandomHorizontalFlip()]
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        dirs = self.split_dirs()
        train_tf, eval_tf = self._transform(train=True), self._transform(train=False)

        def whole(ds, tf) -> _TransformedSubset:  # noqa: ANN001
            return _TransformedSubset(ds, range(len(ds)), tf)

        if "all" in dirs:
            data = self._open(dirs["all"])
            train_idx, val_idx, test_idx = carve_splits(data.targets, self.test_size, self.val_size, self.seed)
            return (
                _TransformedSubset(data, train_idx.tolist(), train_tf),
                _TransformedSubset(data, val_idx.tolist(), eval_tf),
                _TransformedSubset(data, test_idx.tolist(), eval_tf),
            )
        train_data = self._open(dirs["train"])
        if "val" in dirs:
            val_set = whole(self._open(dirs["val"]), eval_tf)
            train_set = whole(train_data, train_tf)
        else:
            train_idx, val_idx = val_holdout(train_data.targets, self.val_size, self.seed)
            train_set = _TransformedSubset(train_data, train_idx.tolist(), train_tf)
            val_set = _TransformedSubset(train_data, val_idx.tolist(), eval_tf)
        test_set = whole(self._open(dirs["test"]), eval_tf) if "test" in dirs else val_set
        return train_set, val_set, test_set
