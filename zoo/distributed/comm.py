"""Collectives for expert parallelism: process groups, a differentiable uneven all-to-all, and a timer
that measures how long the all-to-alls take (benchmarks report it as a share of the step time)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class ExpertParallelGroup:
    """Where this rank stands in expert parallelism.

    The world's ranks form ``world_size / size`` expert-parallel (EP) groups of ``size`` consecutive ranks;
    the experts of every MoE layer are split over the ranks of a group (EP rank r holds experts
    ``[r*E/size, (r+1)*E/size)``). Ranks with the same EP rank in different groups hold the same experts:
    they form a replica group, over which expert gradients are summed (None when there is one EP group).

    ``group`` and ``replica_group`` are process groups of their own, separate from the one DDP uses, so the
    token all-to-alls never interleave with DDP's gradient all-reduces on one communicator.
    """

    group: Optional[dist.ProcessGroup]
    rank: int
    size: int
    replica_group: Optional[dist.ProcessGroup]
    num_replicas: int
    world_size: int

    def __repr__(self) -> str:  # process groups print badly
        return (f"ExpertParallelGroup(rank={self.rank}, size={self.size}, num_replicas={self.num_replicas}, "
                f"world_size={self.world_size})")


_GROUP_CACHE: dict[tuple, ExpertParallelGroup] = {}


def expert_parallel_group(size: Optional[int] = None) -> ExpertParallelGroup:
    """The expert-parallel groups of the current default process group, created on first use (a
    collective: every rank must call it, in the same order). ``size`` None = all ranks in one EP group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed: call dist.init_process_group first "
                           "(Lightning's ExpertParallelStrategy does it for you)")
    world, rank = dist.get_world_size(), dist.get_rank()
    size = world if size is None else int(size)
    if size < 1 or world % size:
        raise ValueError(f"expert_parallel_size={size} must divide the world size {world}")
    key = (id(dist.distributed_c10d._get_default_group()), world, size)
    if key in _GROUP_CACHE:
        return _GROUP_CACHE[key]
    group = replica = None
    for k in range(world // size):  # every rank creates every group, in the same order
        ranks = list(range(k * size, (k + 1) * size))
        g = dist.new_group(ranks)
        if rank in ranks:
            group = g
    if world // size > 1:
        for j in range(size):
            ranks = list(range(j, world, size))
            g = dist.new_group(ranks)
            if rank in ranks:
                replica = g
    ep = ExpertParallelGroup(group, rank % size, size, replica, world // size, world)
    _GROUP_CACHE[key] = ep
    return ep


# ------------------------------------------------------------------------------------------ timing
class CommTimer:
    """Accumulates the wall time of the all-to-alls run while it is active (CUDA: events, synchronised
    when read; CPU: perf_counter). Includes the time spent waiting for the slowest rank."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self._cpu_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def measure(self, x: Tensor) -> Iterator[None]:
        self.calls += 1
        self.bytes += x.numel() * x.element_size()
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t = time.perf_counter()
            yield
            self._cpu_s += time.perf_counter() - t

    @property
    def seconds(self) -> float:
        if self._events:
            torch.cuda.synchronize()
        return self._cpu_s + sum(s.elapsed_time(e) for s, e in self._events) / 1000.0

    def reset(self) -> None:
        self.calls, self.bytes, self._cpu_s, self._events = 0, 0, 0.0, []


_TIMER: Optional[CommTimer] = None


@contextlib.contextmanager
def comm_timer() -> Iterator[CommTimer]:
    """``with comm_timer() as t: ...; t.seconds`` = time spent in expert-parallel all-to-alls."""
    global _TIMER
    previous, _TIMER = _TIMER, CommTimer()
    try:
        yield _TIMER
    finally:
        _TIMER = previous


# ------------------------------------------------------------------------------------ all-to-all
def all_to_all(x: Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
               group: Optional[dist.ProcessGroup]) -> Tensor:
    """``torch.distributed.all_to_all_single`` along dim 0 with uneven splits (not differentiable):
    rows ``input_splits[j]`` go to rank j, ``output_splits[i]`` rows arrive from rank i."""
    x = x.contiguous()
    out = x.new_empty((int(sum(output_splits)),) + tuple(x.shape[1:]))
    ctx = _TIMER.measure(x) if _TIMER is not None else contextlib.nullcontext()
    with ctx:
        dist.all_to_all_single(out, x, list(output_splits), list(input_splits), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:  # type: ignore[override]
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        output_splits, input_splits = ctx.splits
        # The gradient of an all-to-all is the all-to-all with the splits swapped.
        return all_to_all(grad, input_splits, output_splits, ctx.group), None, None, None


def all_to_all_autograd(x: Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
                        group: Optional[dist.ProcessGroup]) -> Tensor:
    """Differentiable :func:`all_to_all`."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def exchange_counts(counts: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """``counts`` [W * n] (n entries per destination rank) -> [W * n]: the n entries each rank sent here."""
    out = torch.empty_like(counts)
    ctx = _TIMER.measure(counts) if _TIMER is not None else contextlib.nullcontext()
    with ctx:
        dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
