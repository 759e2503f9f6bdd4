"""What the datamodules share: the split-and-load base (:class:`SplitDataModule`), the in-memory image dataset,
the seeded hold-out split helpers and the image-classification base.

Dimension letters: N dataset size, B batch, C channels, H height, W width.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.data.sampling import ResumableShuffleSampler, SeededSampleDataset

# The test split is seed-independent wherever we have to carve it ourselves (digits, single-tree ImageFolder),
# so that test numbers stay comparable across training seeds; only the val hold-out follows `seed`.
TEST_SPLIT_SEED = 0


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is an int (not bool) >= ``minimum``, else raise a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def holdout_count(name: str, size: int | float, pool: int) -> int:
    """Turn a hold-out size into a count: an int is a count, a float in (0, 1) a fraction of ``pool``.

    The result must leave at least one sample on each side.
    """
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be an int (count) or a float in (0, 1) (fraction), got {size!r}")
    if isinstance(size, (float, np.floating)):
        if not 0.0 < size < 1.0:
            raise ValueError(f"{name} as a fraction must be in (0, 1), got {size}")
        count = int(round(size * pool))
    else:
        count = int(size)
    if not 1 <= count <= pool - 1:
        raise ValueError(
            f"{name}={size!r} gives {count} samples out of {pool}; it must leave at least 1 on each side"
        )
    return count


def holdout_split(labels: np.ndarray, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..N-1`` into ``(kept, held_out)`` with ``len(held_out) == holdout``, seeded.

    Stratified by ``labels [N]`` whenever that is possible (every present class has >= 2 samples and both
    sides can hold one of each class); otherwise a plain seeded shuffle split. Both index arrays are sorted,
    so samples keep their original relative order.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    n = len(labels)
    if not 1 <= holdout <= n - 1:
        raise ValueError(f"cannot hold out {holdout} of {n} samples")
    _, counts = np.unique(labels, return_counts=True)
    stratify = labels if counts.min() >= 2 and min(holdout, n - holdout) >= len(counts) else None
    kept, held = train_test_split(
        np.arange(n), test_size=holdout, random_state=seed, shuffle=True, stratify=stratify
    )
    return np.sort(kept), np.sort(held)


def val_holdout(labels: np.ndarray, val_size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` indices: a ``val_size`` (count or fraction, see :func:`holdout_count`) stratified hold-out
    of ``labels [N]``, seeded by ``seed``."""
    labels = np.asarray(labels)
    return holdout_split(labels, holdout_count("val_size", val_size, len(labels)), seed)


def carve_splits(labels: np.ndarray, test_size: int | float, val_size: int | float,
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, val, test)`` indices of one labelled pool: first a fixed test hold-out of ``test_size`` (seeded by
    :data:`TEST_SPLIT_SEED`, so test numbers compare across training seeds), then a ``val_size`` hold-out of the
    rest seeded by ``seed``. Sizes are counts or fractions (:func:`holdout_count`); stratified where possible."""
    labels = np.asarray(labels)
    rest, test_idx = holdout_split(labels, holdout_count("test_size", test_size, len(labels)), TEST_SPLIT_SEED)
    train_pos, val_pos = val_holdout(labels[rest], val_size, seed)
    return rest[train_pos], rest[val_pos], test_idx


class InMemoryImageDataset(Dataset):
    """Images held in one tensor, normalised per sample on access.

    Args:
        images: ``[N, C, H, W]`` pixel values in ``[0, pixel_max]`` (uint8 keeps MNIST / CIFAR small in memory).
        labels: ``[N]`` class ids.
        mean, std: per-channel statistics of pixels scaled to [0, 1]; length C.
        pixel_max: the value of a white pixel (255 for uint8 images, 16 for raw digits, 1.0 for floats).
        indices: which rows form this split (a view, so train and val share ``images``); default all.
        augment: optional callable on one ``[C, H, W]`` image (before normalisation, same dtype) -> ``[C, H, W]``.

    ``self[i]`` is ``(image float32 [C, H, W], label int64 [])``; ``source_indices[i]`` is its row in ``images``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        pixel_max: float,
        indices: np.ndarray | torch.Tensor | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [N={images.shape[0]}], got shape {tuple(labels.shape)}")
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values, got {len(mean)} and {len(std)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        all_rows = torch.arange(images.shape[0])
        self.source_indices = all_rows if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.long)
        # Fold "/ pixel_max, - mean, / std" into one multiply-add: x * scale + shift, per channel [C, 1, 1].
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._scale = 1.0 / (pixel_max * std_t)
        self._shift = -mean_t / std_t
        self.augment = augment

    def __len__(self) -> int:
        return int(self.source_indices.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = int(self.source_indices[i])
        image = self.images[row]
        if self.augment is not None:
            image = self.augment(image)
        return image.to(torch.float32) * self._scale + self._shift, self.labels[row]

    @property
    def targets(self) -> torch.Tensor:
        """Labels of this split in order, ``[len(self)]`` int64."""
        return self.labels[self.source_indices]


def image_splits(
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    pixel_max: float,
    train_indices: np.ndarray | torch.Tensor | None,
    eval_indices: Sequence[np.ndarray | torch.Tensor | None],
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[InMemoryImageDataset]:
    """``[train, *evals]``: :class:`InMemoryImageDataset` views of the same ``images`` / ``labels``, one per index
    array (None = all rows); only the train view gets ``augment``."""
    return [InMemoryImageDataset(images, labels, mean, std, pixel_max, indices=idx, augment=aug)
            for idx, aug in [(train_indices, augment), *((idx, None) for idx in eval_indices)]]


def holdout_image_splits(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    pixel_max: float,
    val_size: int | float,
    seed: int,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[InMemoryImageDataset, InMemoryImageDataset, InMemoryImageDataset]:
    """``(train, val, test)`` for a dataset released as a train set and a test set (MNIST, CIFAR): val is a
    stratified, seeded ``val_size`` hold-out of the train set (:func:`val_holdout`), test is the test set whole."""
    train_idx, val_idx = val_holdout(train_labels.numpy(), val_size, seed)
    train, val = image_splits(train_images, train_labels, mean, std, pixel_max, train_idx, [val_idx], augment)
    return train, val, InMemoryImageDataset(test_images, test_labels, mean, std, pixel_max)


def random_crop_flip(padding: int, flip: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """Augmentation for one ``[C, H, W]`` image: zero-pad by ``padding``, random crop back to H x W, and
    (if ``flip``) horizontal flip with probability 1/2. Uses torch's global RNG, which Lightning / DataLoader
    workers seed."""

    def augment(image: torch.Tensor) -> torch.Tensor:
        _, h, w = image.shape
        if padding > 0:
            padded = torch.nn.functional.pad(image, (padding, padding, padding, padding))
            top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
            image = padded[:, top : top + h, left : left + w]
        if flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image

    return augment


def usable_workers(requested: int) -> int:
    """``requested`` loader workers, at most the CPU cores this process may use: recipes are written for GPU hosts
    (4-8 workers), and more workers than cores only adds processes (torch warns about it) and slows a small machine.
    The data and its order do not depend on the worker count, so capping changes nothing but speed."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > cores:
        print(f"[zoo.data] num_workers={requested} > {cores} usable CPU cores: using {cores}", flush=True)
        return cores
    return requested


@dataclass(frozen=True)
class LoaderArgs:
    """The loader settings every zoo datamodule takes (one typed group, declared once).

    Datamodules take them as flat keyword arguments (``--data.batch_size``, ``data.init_args.num_workers`` in
    a recipe, ``MNISTDataModule(batch_size=32)``): each ``__init__`` passes ``**loader`` on to
    :class:`SplitDataModule`, which fills one ``LoaderArgs`` (``dm.loader``) from them and the class's
    ``loader_defaults``. Validated on construction.

    Args:
        batch_size: samples per batch (all loaders).
        num_workers: DataLoader worker processes; 0 loads in the main process.
        seed: seeds the val hold-out, the train shuffle order and the train augmentation.
        pin_memory: DataLoader ``pin_memory`` (useful when training on a GPU).
        persistent_workers: keep the worker processes between epochs; None = whenever ``num_workers > 0``.
    """

    batch_size: int = 64
    num_workers: int = 0
    seed: int = 0
    pin_memory: bool = False
    persistent_workers: Optional[bool] = None

    def __post_init__(self) -> None:
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("num_workers", self.num_workers, minimum=0)
        check_positive_int("seed", self.seed, minimum=0)
        for name in ("pin_memory", "persistent_workers"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "persistent_workers" and value is None):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if self.persistent_workers and self.num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0 (there are no worker processes to keep)")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def updated(self, values: Mapping[str, Any]) -> "LoaderArgs":
        """A copy with the fields ``values`` gives (other keys and None values are ignored: None means "the
        default")."""
        return replace(self, **{k: values[k] for k in self.names() if values.get(k) is not None})

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.names()}

    def dataloader(self, dataset: Dataset, sampler: Any = None, drop_last: bool = False,
                   collate_fn: Callable[[list[Any]], Any] | None = None) -> DataLoader:
        """A DataLoader over ``dataset`` with these settings."""
        persistent = self.num_workers > 0 if self.persistent_workers is None else self.persistent_workers
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=persistent and self.num_workers > 0,
                          drop_last=drop_last, collate_fn=collate_fn)


class _LoaderField:
    """``dm.batch_size`` etc.: a field of ``dm.loader``, read and (validated) written through it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type) -> Any:
        if obj is None:
            return self
        return getattr(obj.loader, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.loader = replace(obj.loader, **{self.name: value})


def init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``cls(...)`` accepts: its ``__init__``'s named parameters plus, where it passes
    ``**kwargs`` on to its base class (as every zoo datamodule does with its loader arguments), the base's."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__).parameters
        for name, p in sig.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.setdefault(name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in sig.values()):
            break
    return params


class SplitDataModule(L.LightningDataModule):
    """Base of the zoo's datamodules: a subclass builds ``(train, val, test)`` datasets once
    (:meth:`build_splits`); this class gives the loaders, seeded shuffling and the loader arguments.

    A subclass's ``__init__`` takes its own arguments plus ``**loader`` and calls ``super().__init__(**loader)``
    (jsonargparse follows ``**loader`` into this signature, so the CLI takes ``--data.batch_size`` etc. flat).
    The resolved group is ``self.loader`` (:class:`LoaderArgs`); ``batch_size``, ``num_workers``, ``seed``,
    ``pin_memory`` and ``persistent_workers`` read (and write) its fields. A subclass calling
    :meth:`save_hyperparameters` records its init args and the resolved loader group.

    After :meth:`setup`: ``train_set``, ``val_set``, ``test_set``.

    Args:
        batch_size: samples per batch (all loaders); None = the class's default (``loader_defaults``).
        num_workers: DataLoader worker processes; 0 loads in the main process (the tensors are in memory). More
            than the usable CPU cores are capped to them (:func:`usable_workers`).
        seed: seeds the val hold-out, the train shuffle order and the train augmentation.
        pin_memory: DataLoader ``pin_memory`` (useful when training on a GPU).
        persistent_workers: keep the loader workers between epochs; None = whenever ``num_workers > 0``.

    The train order and augmentation are functions of ``(seed, epoch, position)`` (:mod:`zoo.data.sampling`);
    :meth:`state_dict` records where the running epoch stands, so a run resumed from a checkpoint continues with
    exactly the batches the uninterrupted run would have seen next.
    """

    # Drop the last, smaller train batch (when the train split has more than one batch). Off by default; the
    # contrastive datamodules set it: a small last batch has few negatives, so its loss is noisier.
    drop_last_train: bool = False
    # How a loader turns a list of samples into a batch (None: torch's default_collate); instruction data pads.
    collate_fn: Callable[[list[Any]], Any] | None = None
    # The loader settings an argument left at None takes (a subclass sets its own default batch size here).
    loader_defaults: ClassVar[LoaderArgs] = LoaderArgs()

    batch_size = _LoaderField()
    num_workers = _LoaderField()
    seed = _LoaderField()
    pin_memory = _LoaderField()
    persistent_workers = _LoaderField()

    def __init__(self, batch_size: Optional[int] = None, num_workers: int = 0, seed: int = 0,
                 pin_memory: bool = False, persistent_workers: Optional[bool] = None) -> None:
        super().__init__()
        requested = self.loader_defaults.updated(dict(batch_size=batch_size, num_workers=num_workers, seed=seed,
                                                      pin_memory=pin_memory, persistent_workers=persistent_workers))
        self._requested_loader = requested  # what the hyper-parameters record (before capping the workers)
        self.loader = replace(requested, num_workers=usable_workers(requested.num_workers))
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._train_sampler: ResumableShuffleSampler | None = None
        self._resume_order: dict[str, Any] | None = None  # from a checkpoint, applied once the sampler exists

    def save_hyperparameters(self, *args: Any, ignore: Sequence[str] | str | None = None,
                             frame: Any = None, logger: bool = True) -> None:
        """Lightning's, from the calling ``__init__``, plus the resolved loader group (so ``hparams`` holds the
        batch size the run used even where it came from ``loader_defaults``)."""
        frame = frame if frame is not None else inspect.currentframe().f_back
        super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)
        if not args:  # (hparams are a dict: this updates them)
            super().save_hyperparameters(self._requested_loader.as_dict(), frame=frame, logger=logger)

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        """Load the data and return the ``(train, val, test)`` datasets."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_splits()")

    def setup(self, stage: str | None = None) -> None:
        """Build all three splits once (cheap for these datasets, and keeps the split independent of stage)."""
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.build_splits()
            self._train_sampler = self._new_train_sampler(len(self.train_set))  # type: ignore[arg-type]
            self._apply_resume_order()

    def _shard_train_sampler_for_the_trainer(self) -> None:
        """The datamodule may have been set up before a multi-process trainer was attached (the CLI reads the
        vocabulary first): make the sampler this process's share now, keeping where the order stands (a resume
        position already loaded from the checkpoint)."""
        self._train_sampler = self._train_sampler.for_replicas(*self._data_parallel_split())

    def _new_train_sampler(self, size: int) -> ResumableShuffleSampler:
        """The resumable training order; with several processes (DDP, expert parallelism, FSDP) this process's
        share of it, which Lightning then leaves as it is
        (:class:`zoo.data.sampling.ShardedResumableShuffleSampler`)."""
        return ResumableShuffleSampler(size, self.seed).for_replicas(*self._data_parallel_split())

    def _data_parallel_split(self) -> tuple[int, int]:
        """(data-parallel processes, this one's rank) from the trainer's strategy, (1, 0) without one. DDP: every
        process; the processes of one tensor-parallel group would share a share."""
        split = getattr(getattr(self.trainer, "strategy", None), "distributed_sampler_kwargs", None) or {}
        return split.get("num_replicas", 1), split.get("rank", 0)

    @property
    def split_sizes(self) -> dict[str, int]:
        """``{"train": n, "val": n, "test": n}`` (call :meth:`setup` first)."""
        self._require_setup()
        return {"train": len(self.train_set), "val": len(self.val_set), "test": len(self.test_set)}  # type: ignore[arg-type]

    def _require_setup(self) -> None:
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called before using the dataloaders")

    # ------------------------------------------------------------------------------- resumable order
    def state_dict(self) -> dict[str, Any]:
        """Where the train order stands (saved in checkpoints by Lightning): the epoch being iterated, how many
        of its batches were trained, and whether that finished the epoch."""
        sampler, trainer = self._train_sampler, self.trainer
        if sampler is None or sampler.epoch < 0 or trainer is None:
            return {}
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        # batches_done counts this process's batches; world_size turns them into positions of the epoch
        return {"train_order": {"epoch": sampler.epoch, "batches_done": done, "batch_size": self.batch_size,
                                "world_size": sampler.num_replicas,
                                "epoch_finished": done >= trainer.num_training_batches, "seed": self.seed}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        order = state_dict.get("train_order")
        if order:
            self._resume_order = dict(order)
            self._apply_resume_order()

    def _apply_resume_order(self) -> None:
        order, sampler = self._resume_order, self._train_sampler
        if order is None or sampler is None:
            return
        if order["epoch_finished"]:
            sampler.resume_at(order["epoch"] + 1, 0)
        else:
            trained = order["batches_done"] * order["batch_size"] * order.get("world_size", 1)  # by every process
            sampler.resume_at(order["epoch"], min(sampler.total, trained))
        self._resume_order = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        self._require_setup()
        assert dataset is not None
        if shuffle:
            self._shard_train_sampler_for_the_trainer()
        return self.loader.dataloader(
            SeededSampleDataset(dataset) if shuffle else dataset,
            sampler=self._train_sampler if shuffle else None,
            drop_last=shuffle and self.drop_last_train and len(dataset) > self.batch_size,  # type: ignore[arg-type]
            collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class ImageClassificationDataModule(SplitDataModule):
    """Base of all image-classification datamodules (:class:`SplitDataModule` arguments and loaders).

    Batches are ``(images float32 [B, C, H, W] normalised with (mean, std), labels int64 [B])``.

    Attributes read by models and tasks (set by subclasses, valid right after construction unless a subclass
    documents otherwise): ``num_classes``, ``class_names`` (list of str), ``image_size`` (square side),
    ``in_chans``, ``mean`` / ``std`` (per channel, for pixels in [0, 1]).

    Subclasses implement :meth:`build_splits`, returning datasets of ``(image [C, H, W], label [])`` pairs.
    """

    num_classes: int
    class_names: list[str]
    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
