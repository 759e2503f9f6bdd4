"""Multi-GPU (and multi-process CPU) training: DDP with expert parallelism for every MoE layer.

- :class:`ExpertParallelStrategy` (Lightning; registered in Lightning's StrategyRegistry as
  ``"expert_parallel"``, ``"expert_parallel_spawn"``, ``"expert_parallel_fork"`` once
  ``zoo.distributed.strategy`` is imported: ``from zoo.distributed import ExpertParallelStrategy`` does it,
  and so does ``import zoo.distributed`` after Lightning was imported).
- Plain PyTorch: :func:`shard_experts`, :func:`wrap_ddp`, :func:`full_state_dict`,
  :func:`sync_expert_grads`, :func:`clip_grad_norm_` (see :mod:`zoo.distributed.expert_parallel`).
- :func:`expert_parallel_dispatch`: the all-to-all dispatcher (same contract as ``zoo.moe.dispatch``).
- :func:`spawn`: N local processes with a process group (tests, CPU smoke runs, benchmarks).
"""

from zoo.distributed.comm import ExpertParallelGroup, all_to_all_autograd, comm_timer, expert_parallel_group
from zoo.distributed.expert_parallel import (ShardedExperts, clip_grad_norm_, expert_parallel_dispatch,
                                             expert_parameters, full_optimizer_state_dict, full_state_dict,
                                             ignore_experts_in_ddp, is_sharded, shard_experts,
                                             shard_optimizer_state_dict, sync_expert_grads, unshard_experts,
                                             wrap_ddp)
from zoo.distributed.launch import free_port, init_process_group, spawn

import sys as _sys

if "lightning.pytorch" in _sys.modules:  # Lightning already loaded: register the strategy names now
    from zoo.distributed.strategy import ExpertParallelStrategy  # noqa: F401


def __getattr__(name: str):
    # Importing Lightning costs seconds; plain-PyTorch users (and worker processes) do not pay for it.
    if name == "ExpertParallelStrategy":
        from zoo.distributed.strategy import ExpertParallelStrategy
        return ExpertParallelStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ExpertParallelStrategy", "ExpertParallelGroup", "ShardedExperts", "expert_parallel_group",
    "expert_parallel_dispatch", "shard_experts", "unshard_experts", "wrap_ddp", "ignore_experts_in_ddp",
    "expert_parameters", "is_sharded", "full_state_dict", "full_optimizer_state_dict", "shard_optimizer_state_dict",
    "sync_expert_grads", "clip_grad_norm_", "all_to_all_autograd", "comm_timer", "spawn", "free_port",
    "init_process_group",
]
