"""Getting MNIST and CIFAR-10 on a new machine: torchvision's dataset layouts and its downloads.

The MNIST and CIFAR-10 datamodules read, in this order, from the data root (``data_dir``, ``$ZOO_DATA``, the
defaults of :mod:`zoo.data.paths`):

1. this project's folders, ``<root>/mnist/`` (the four IDX files) and ``<root>/cifar10_convnetjs_subset/`` (the
   ConvNetJS sprites of ``../shared/data``);
2. torchvision's layouts, ``<root>/MNIST/raw/`` (what ``torchvision.datasets.MNIST(root)`` keeps) and
   ``<root>/cifar-10-batches-py/`` (``torchvision.datasets.CIFAR10(root)``: the official python pickles);
3. with ``download=True`` (CLI: ``--data.download=true``), torchvision downloads them into ``<root>`` (needs
   internet; torchvision checks every file's md5) and 2. is read.

The same images come out of every layout: the CIFAR-10 train "batch" ``k`` is official train images
1000k..1000k+999 (the sprite numbering), the test batch is official test images 0..999.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from zoo.data.paths import HOW_TO_POINT_ELSEWHERE, resolve_data_root

PathLike = str | os.PathLike[str]

MNIST_TORCHVISION_DIR = Path("MNIST") / "raw"
CIFAR10_TORCHVISION_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_IMAGES = 50000
CIFAR10_BATCH_IMAGES = 1000  # one "train batch" of the sprite numbering

# Where each dataset comes from, shown in the error for a missing folder (the README has the same list).
HOW_TO_GET = {
    "mnist": ("MNIST (Yann LeCun, Corinna Cortes, Christopher Burges; yann.lecun.com/exdb/mnist): pass "
              "--data.download=true to fetch it with torchvision (needs internet) into <data root>/MNIST/raw, or put "
              "the 4 original IDX .gz files in <data root>/mnist/"),
    "cifar10": ("CIFAR-10 (Krizhevsky 2009, www.cs.toronto.edu/~kriz/cifar.html): pass --data.download=true to fetch "
                "the official python release with torchvision (needs internet, 170 MB) into "
                "<data root>/cifar-10-batches-py, or put the ConvNetJS sprites (see the README's data section) in "
                "<data root>/cifar10_convnetjs_subset/"),
}


def missing_dataset_error(dataset: str, err: FileNotFoundError) -> FileNotFoundError:
    """``err`` (the folder search's error) plus how to get ``dataset`` ("mnist" or "cifar10")."""
    return FileNotFoundError(f"{err} To get {HOW_TO_GET[dataset]}.")


def _roots(data_dir: Optional[PathLike]) -> tuple[Path, ...]:
    """The data roots to look in for torchvision layouts (the one chosen, or every default)."""
    return resolve_data_root(data_dir).searched


def download_root(data_dir: Optional[PathLike]) -> Path:
    """Where a download goes: the chosen data root (``data_dir``, ``$ZOO_DATA``, else the first default)."""
    return resolve_data_root(data_dir).path


# ------------------------------------------------------------------------------------------------------ MNIST
def torchvision_mnist_dir(data_dir: Optional[PathLike]) -> Optional[Path]:
    """``<root>/MNIST/raw`` holding the train image file (gunzipped or not) under the first root that has one."""
    for root in _roots(data_dir):
        folder = root / MNIST_TORCHVISION_DIR
        if any((folder / name).is_file() for name in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz")):
            return folder
    return None


def download_mnist(data_dir: Optional[PathLike]) -> Path:
    """Download MNIST with ``torchvision.datasets.MNIST`` (md5-checked; nothing happens when the files are there)
    into ``<data root>/MNIST/raw``; returns that folder."""
    from torchvision.datasets import MNIST

    root = download_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        MNIST(str(root), train=train, download=True)
    return root / MNIST_TORCHVISION_DIR


def _existing_or_downloaded(find, download_fn, name: str, data_dir: Optional[PathLike], download: bool,
                            err: FileNotFoundError) -> Path:
    """``find(data_dir)`` (torchvision's layout) when it finds the folder, else ``download_fn(data_dir)`` when
    ``download``, else ``err`` with how to get dataset ``name``."""
    folder = find(data_dir)
    if folder is not None:
        return folder
    if download:
        return download_fn(data_dir)
    raise missing_dataset_error(name, err) from None


def mnist_folder(data_dir: Optional[PathLike], download: bool, err: FileNotFoundError) -> Path:
    """The MNIST folder when the project's ``mnist/`` was not found (``err``): torchvision's layout, else a
    download when asked, else ``err`` with how to get the data."""
    return _existing_or_downloaded(torchvision_mnist_dir, download_mnist, "mnist", data_dir, download, err)


# ---------------------------------------------------------------------------------------------------- CIFAR-10
def torchvision_cifar10_dir(data_dir: Optional[PathLike]) -> Optional[Path]:
    """``<root>/cifar-10-batches-py`` holding ``test_batch`` under the first root that has one."""
    for root in _roots(data_dir):
        folder = root / CIFAR10_TORCHVISION_DIR
        if (folder / "test_batch").is_file():
            return folder
    return None


def download_cifar10(data_dir: Optional[PathLike]) -> Path:
    """Download CIFAR-10 with ``torchvision.datasets.CIFAR10`` into ``<data root>/cifar-10-batches-py``."""
    from torchvision.datasets import CIFAR10

    root = download_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    CIFAR10(str(root), train=False, download=True)
    return root / CIFAR10_TORCHVISION_DIR


def cifar10_folder(data_dir: Optional[PathLike], download: bool, err: FileNotFoundError) -> Path:
    """The torchvision CIFAR-10 folder when the sprite folder was not found (``err``), downloading when asked;
    else ``err`` with how to get the data."""
    return _existing_or_downloaded(torchvision_cifar10_dir, download_cifar10, "cifar10", data_dir, download, err)


def read_cifar10_batches(folder: Path, train_batches: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                           np.ndarray]:
    """Read torchvision's CIFAR-10 folder with ``torchvision.datasets.CIFAR10`` (which checks the files' md5s).

    Returns ``(train images uint8 [1000 * len(train_batches), 3, 32, 32], train labels int64, test images uint8
    [1000, 3, 32, 32], test labels int64)``: train images 1000k..1000k+999 for each k of ``train_batches`` and test
    images 0..999, the subset the sprite folder holds."""
    from torchvision.datasets import CIFAR10

    root = str(folder.parent)
    try:
        train, test = CIFAR10(root, train=True), CIFAR10(root, train=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(f"{folder}: {err} (torchvision found missing or corrupt files). "
                                f"{HOW_TO_POINT_ELSEWHERE}") from None
    if len(train.data) < CIFAR10_BATCH_IMAGES * (max(train_batches) + 1):
        raise ValueError(f"{folder} holds {len(train.data)} train images; train_batches {train_batches} need "
                         f"{CIFAR10_BATCH_IMAGES * (max(train_batches) + 1)}")
    rows = np.concatenate([np.arange(k * CIFAR10_BATCH_IMAGES, (k + 1) * CIFAR10_BATCH_IMAGES) for k in train_batches])

    def chw(images: np.ndarray) -> np.ndarray:  # torchvision keeps [N, H, W, C]
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))

    return (chw(train.data[rows]), np.asarray(train.targets, dtype=np.int64)[rows],
            chw(test.data[:CIFAR10_BATCH_IMAGES]), np.asarray(test.targets[:CIFAR10_BATCH_IMAGES], dtype=np.int64))
