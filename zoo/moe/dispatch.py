"""Dispatchers: move tokens to their experts and combine the outputs, given a router's decision.

All take flattened slots: ``x [T, D]``, ``expert_index / combine_weight / keep [T, K]`` and any
:class:`~zoo.moe.experts.Experts`, and return
``y [T, D] = sum_k keep[t,k] * combine_weight[t,k] * expert_{expert_index[t,k]}(x[t])``.
The fused GPU kernel (``zoo.kernels.fused_moe``) implements the same contract; :func:`loop_dispatch` is the one
ground truth for all of them (:func:`reference_moe` is it on raw stacked tensors, for the kernel tests).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from zoo.moe.experts import Experts, StackedWeights


def _accumulate_dtype(x: Tensor) -> torch.dtype:
    """Accumulate in at least fp32 (bf16/fp16 inputs), but never below the input precision (fp64)."""
    return torch.promote_types(x.dtype, torch.float32)


def loop_dispatch(x: Tensor, expert_index: Tensor, combine_weight: Tensor, keep: Tensor,
                  experts: Experts | StackedWeights) -> Tensor:
    """Ground truth: one pass per expert over the slots routed to it (``experts.expert(e, rows)``). A slot whose
    expert index is outside [0, E) is dropped, as in the fused kernel."""
    T, D = x.shape
    acc = _accumulate_dtype(x)
    y = torch.zeros(T, D, dtype=acc, device=x.device)
    keep = keep.bool()
    for e in range(experts.num_experts):
        token, slot = torch.nonzero(keep & (expert_index == e), as_tuple=True)
        if token.numel() == 0:
            continue
        out = experts.expert(e, x[token]).to(acc) * combine_weight[token, slot].unsqueeze(-1).to(acc)
        y = y.index_add(0, token, out)
    return y.to(x.dtype)


def reference_moe(x: Tensor, expert_index: Tensor, combine_weight: Tensor, keep: Tensor, w1: Tensor,
                  b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], activation: str = "gelu_tanh") -> Tensor:
    """:func:`loop_dispatch` on stacked expert tensors, with the fused kernel's signature
    (``zoo.kernels.fused_moe``): its ground truth. Differentiable with respect to every floating-point input; pass
    float64 copies for a high-precision reference."""
    return loop_dispatch(x, expert_index, combine_weight, keep, StackedWeights(w1, b1, w2, b2, activation))


def sorted_dispatch(x: Tensor, expert_index: Tensor, combine_weight: Tensor, keep: Tensor,
                    experts: Experts) -> Tensor:
    """Sort kept slots by expert (stable), gather, run each expert on its contiguous rows
    (``experts.forward_grouped``), scatter back to a ``[T, K, D]`` buffer and sum over K. Deterministic (no
    atomics) on CPU and GPU."""
    T, D = x.shape
    K = expert_index.shape[1]
    E = experts.num_experts
    flat_expert = torch.where(keep, expert_index, torch.full_like(expert_index, E)).reshape(-1)  # [T*K]
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=E + 1)
    num_kept = int(counts[:E].sum())  # one host sync: row counts drive the per-expert split
    order = order[:num_kept]
    token = order // K
    x_sorted = x[token]
    y_sorted = experts.forward_grouped(x_sorted, counts[:E].tolist())
    acc = _accumulate_dtype(x)
    y_sorted = y_sorted.to(acc) * combine_weight.reshape(-1)[order].unsqueeze(-1).to(acc)
    slots = torch.zeros(T * K, D, dtype=acc, device=x.device)
    slots = slots.index_copy(0, order, y_sorted)  # every kept slot written exactly once
    return slots.view(T, K, D).sum(dim=1).to(x.dtype)


def dense_dispatch(x: Tensor, expert_index: Tensor, combine_weight: Tensor, keep: Tensor,
                   experts: Experts) -> Tensor:
    """Every expert on every token (``experts.forward_dense`` on ``[E, T, D]``), then each slot picks its expert's
    row: E / K times the expert FLOPs of the other dispatchers, but no data-dependent shapes and no host sync.

    For traced inference (:class:`~zoo.moe.layer.MoELayer` uses it in eval mode under ``torch.compile`` when the
    fused kernel does not apply, e.g. a compiled decode step on the CPU): :func:`sorted_dispatch`'s per-expert row
    counts are host values, which break the traced graph and recompile it for every new routing pattern. Decode
    steps have few tokens, so the extra FLOPs are small there."""
    T, D = x.shape
    E = experts.num_experts
    acc = _accumulate_dtype(x)
    y_all = experts.forward_dense(x.unsqueeze(0).expand(E, T, D))  # [E, T, D]
    valid = keep.bool() & (expert_index >= 0) & (expert_index < E)  # out-of-range slots dropped, as in loop_dispatch
    picked = y_all[expert_index.clamp(0, E - 1), torch.arange(T, device=x.device)[:, None]]  # [T, K, D]
    weight = torch.where(valid, combine_weight.to(acc), torch.zeros((), dtype=acc, device=x.device))
    return (picked.to(acc) * weight.unsqueeze(-1)).sum(dim=1).to(x.dtype)


DISPATCHERS = {"loop": loop_dispatch, "sorted": sorted_dispatch}
