"""Start N local processes with a process group (tests, CPU smoke runs, benchmarks): ``spawn(fn, N)``."""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (for the rendezvous of a local process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, port: int, backend: Optional[str] = None,
                       host: str = "127.0.0.1", timeout_s: float = 300.0) -> str:
    """Join a TCP-rendezvous process group (``backend`` None: nccl with CUDA, else gloo). On CUDA, rank r
    uses GPU r. Returns the backend."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    return backend


def _entry(rank: int, fn: Callable, world_size: int, port: int, backend: Optional[str], threads: Optional[int],
           args: tuple) -> None:
    if threads:
        torch.set_num_threads(threads)
    init_process_group(rank, world_size, port, backend)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args: Any, backend: Optional[str] = None,
          threads: Optional[int] = 1, start_method: str = "spawn") -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes that share a process group
    (rendezvous on 127.0.0.1 at a free port). ``fn`` must be importable (a module-level function); an
    exception in any process is raised here. ``threads``: torch intra-op threads per process.
    ``start_method="fork"`` starts much faster (no re-import) but only suits CPU work: once this process has
    initialised CUDA, a forked child can use neither CUDA nor autograd (its device threads do not survive a
    fork), so "fork" then falls back to "spawn"."""
    if start_method == "fork" and torch.cuda.is_initialized():
        start_method = "spawn"
    port = free_port()
    mp.start_processes(_entry, args=(fn, world_size, port, backend, threads, args), nprocs=world_size, join=True,
                       start_method=start_method)
