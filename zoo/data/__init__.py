"""Datamodules for MoE Zoo. Image classification: batches are ``(images float32 [B, C, H, W], labels int64 [B])``.

Real datasets are read from ``data_dir``, else ``$ZOO_DATA``, else ``<repo root>/../shared/data``, else ``./data``
(see :mod:`zoo.data.paths`); the digits datamodule needs no files.
"""

from zoo.data.base import ImageClassificationDataModule, InMemoryImageDataset, LoaderArgs, holdout_split
from zoo.data.image_classification import (
    CIFAR10_CLASS_NAMES,
    CIFAR10SpriteDataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
)
from zoo.data.paths import ENV_VAR, find_dataset_dir, resolve_data_dir, resolve_data_root

# Short names for configs and scripts ("--data digits" style lookups).
IMAGE_CLASSIFICATION_DATAMODULES: dict[str, type[ImageClassificationDataModule]] = {
    "digits": DigitsDataModule,
    "mnist": MNISTDataModule,
    "cifar10_sprites": CIFAR10SpriteDataModule,
    "image_folder": ImageFolderDataModule,
}

__all__ = [
    "CIFAR10_CLASS_NAMES",
    "CIFAR10SpriteDataModule",
    "DigitsDataModule",
    "ENV_VAR",
    "IMAGE_CLASSIFICATION_DATAMODULES",
    "ImageClassificationDataModule",
    "ImageFolderDataModule",
    "InMemoryImageDataset",
    "LoaderArgs",
    "MNISTDataModule",
    "find_dataset_dir",
    "holdout_split",
    "resolve_data_dir",
    "resolve_data_root",
]
