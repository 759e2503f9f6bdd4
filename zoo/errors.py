"""Errors of loading and publishing pretrained weights (a :class:`zoo.config.ConfigError` is a bad setting)."""

from __future__ import annotations


class PretrainedError(RuntimeError):
    """Pretrained weights could not be found, verified or loaded."""


class WeightsNotFoundError(PretrainedError, FileNotFoundError):
    """A weights/config file is missing (locally, in the hub repo, or in the offline cache)."""


class CorruptCheckpointError(PretrainedError):
    """A weights file is truncated or not in the expected format."""


class ChecksumError(CorruptCheckpointError):
    """A weights file does not have the sha256 its preset tag / manifest / ``pretrained.json`` records (a file with
    another hash is corrupt or another version, hence a :class:`CorruptCheckpointError`)."""


class CheckpointMismatchError(PretrainedError):
    """The weights do not fit the model: foreign checkpoint, missing/unexpected keys or shape mismatch."""
