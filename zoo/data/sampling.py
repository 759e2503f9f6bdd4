"""Resumable training order: the shuffle and the augmentation randomness of a training epoch are functions of
``(seed, epoch, position)`` only, so a run resumed from a checkpoint taken after any batch sees exactly the batches
(and augmented pixels) the uninterrupted run would have seen.

- :class:`ResumableShuffleSampler`: epoch ``e`` is ``torch.randperm(N)`` drawn from a generator seeded by
  ``(seed, e)``; it yields :class:`SeededIndex` (an ``int`` carrying the seed of its sample's augmentation) and
  can start an epoch part-way (:meth:`ResumableShuffleSampler.resume_at`).
- :class:`SeededSampleDataset`: wraps the training dataset; fetching a :class:`SeededIndex` seeds torch's CPU
  generator from the index's seed for that one sample (and restores the caller's generator state), so
  augmentation does not depend on which process or worker loads the sample, nor on what ran before.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixing integer ``keys`` (e.g. ``(seed, epoch, position)``) with SplitMix64, so nearby keys
    give unrelated seeds. Pure integer arithmetic (~1 us): the sampler calls it once per training sample."""
    h = 0
    for key in keys:
        h = _splitmix64(h ^ (int(key) & _MASK64))
    return h >> 1


class SeededIndex(int):
    """A dataset index that also carries the seed of its sample's random augmentation (``.seed``)."""

    seed: int

    def __new__(cls, index: int, seed: int) -> "SeededIndex":
        obj = super().__new__(cls, index)
        obj.seed = seed
        return obj

    def __reduce__(self) -> tuple[Any, tuple[int, int]]:  # to DataLoader workers and back
        return SeededIndex, (int(self), self.seed)


class ResumableShuffleSampler(Sampler[int]):
    """Shuffled indices ``0..size-1``, a new order each epoch, reproducible from ``seed`` alone.

    Each ``iter()`` is one epoch (the first is epoch 0, or the one set by :meth:`resume_at`). Yields
    :class:`SeededIndex` values whose ``.seed`` is ``derive_seed(seed, epoch, position)``.

    Several processes (``num_replicas`` > 1, this one ``rank``): the epoch's order is padded to a multiple of
    ``num_replicas`` by repeating its first samples (as torch's ``DistributedSampler``), and this rank takes the
    positions ``rank, rank + num_replicas, ...`` of it; a sample's augmentation seed depends on its position in the
    epoch only, not on the number of processes.

    State: :attr:`epoch` is the epoch being iterated; a run resumed with :meth:`resume_at(epoch, skip)` starts
    that epoch after its first ``skip`` positions (the samples every rank together already trained).
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not one of the {num_replicas} replicas")
        self.size = int(size)
        self.seed = int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.total = -(-self.size // self.num_replicas) * self.num_replicas  # padded epoch length, all ranks
        self._next_epoch = 0  # the epoch the next iter() runs
        self._next_skip = 0  # positions of that epoch already trained (a resumed run)
        self.epoch = -1  # the epoch being (or last) iterated; -1 before the first

    def __len__(self) -> int:
        return self.total // self.num_replicas  # this rank's share of a whole epoch (also when resumed part-way)

    def resume_at(self, epoch: int, skip: int) -> None:
        """The next ``iter()`` is epoch ``epoch``, starting at its ``skip``-th position."""
        if not 0 <= skip <= self.total:
            raise ValueError(f"cannot resume at sample {skip} of an epoch of {self.total}")
        self._next_epoch, self._next_skip = int(epoch), int(skip)

    def for_replicas(self, num_replicas: int, rank: int) -> "ResumableShuffleSampler":
        """This order as ``rank``'s share of ``num_replicas`` processes, at the same pending position (the epoch and
        skip the next ``iter()`` starts from): ``self`` when it already is that share."""
        if (num_replicas, rank) == (self.num_replicas, self.rank):
            return self
        cls = ShardedResumableShuffleSampler if num_replicas > 1 else ResumableShuffleSampler
        new = cls(self.size, self.seed, num_replicas, rank)
        new.resume_at(self._next_epoch, self._next_skip)
        return new

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of epoch ``epoch``, ``[size]`` int64."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[int]:
        epoch, skip = self._next_epoch, self._next_skip
        self.epoch, self._next_epoch, self._next_skip = epoch, epoch + 1, 0
        order = self.order(epoch).tolist()
        order += order[:self.total - self.size]  # padding (several replicas only)
        for position in range(skip + self.rank, self.total, self.num_replicas):
            yield SeededIndex(order[position], derive_seed(self.seed, epoch, position))


class ShardedResumableShuffleSampler(ResumableShuffleSampler, DistributedSampler):
    """:class:`ResumableShuffleSampler` for one of several processes, and a ``DistributedSampler`` by type so that
    Lightning uses it as it is: Lightning wraps any other sampler in its ``DistributedSamplerWrapper``, which
    lists one epoch up front and indexes it by the full epoch length, so a run resumed part-way into an epoch
    (fewer samples left) failed with an IndexError on its first batch, and the skipped samples would have been
    counted per rank instead of for all ranks. ``DistributedSampler.__init__`` is not run: nothing of it is used."""

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start; the sampler keeps its own epoch (resumable), so it is ignored
        (``DistributedSampler.set_epoch`` would overwrite :attr:`epoch`, the checkpointed one)."""


class SeededSampleDataset(Dataset):
    """``dataset`` whose samples fetched by :class:`SeededIndex` see torch's CPU generator seeded by the index's
    seed (random augmentation reproducible per sample); other indices pass through. Attributes of ``dataset``
    are reachable through the wrapper."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        seed = getattr(index, "seed", None)
        if seed is None:
            return self.dataset[index]
        generator = torch.default_generator
        outer = generator.get_state()  # leave the caller's stream (dropout, noise) as it was
        generator.manual_seed(seed)
        try:
            return self.dataset[int(index)]
        finally:
            generator.set_state(outer)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
