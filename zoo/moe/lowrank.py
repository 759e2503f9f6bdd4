"""The low-rank path of LoRA experts (:class:`zoo.moe.experts.LoRAExperts`): the frozen base GEMMs plus the
low-rank products on the routed tokens, never materialising per-expert weights.

Why (``benchmarks/results/lora_experts.md``, H200, bf16, Uni-MoE sizes D 4096, F 11008, r 8, top-2): for a
TRAINING step (forward + backward, gradients to the LoRA factors and the input) this path is 1.15-2.33x faster
than merging ``base + s A B`` into full [E, D, H'] weights every step and running the fused kernel on them, with
1.65-4.08x less peak memory (the merged weights and their gradients are E full FFNs). For inference, merged-once
weights on the fused kernel stay fastest, so :class:`LoRAExperts` takes this path only while its factors train.

Not the fused kernel plus a delta: the kernel applies SwiGLU between its two GEMMs, and the gate/up delta enters
before that activation and the down delta after it, so a delta cannot be added to the kernel's output.

Shapes: T tokens, K slots per token (slot ``s = t*K + k``), E experts, D model width, H' = the first layer's
width (SwiGLU: 2H, gate columns then up columns), r / r' the LoRA ranks of the two layers (SwiGLU: r' = 2r).

* Base GEMMs. Per-expert base (``w1 [E, D, H']``, ``w2 [E, H, D]``): the T*K slots sorted by expert, one grouped
  GEMM per layer, ``torch._grouped_mm`` (CUTLASS grouped GEMM, the fused path's grouped_mm backend) where
  :func:`grouped_mm_usable` says so, else a loop over experts (same result; one host sync for the row counts).
  Shared base (``w1 [D, H']``): one dense GEMM per TOKEN for the first layer (half the rows of a per-slot GEMM at
  top-2), one per slot for the second (its input differs per expert).
* Low-rank products of ALL experts as one GEMM each: ``u = rows @ [A[0] | .. | A[E-1]]`` ([N, E*r], E*r = 64-128
  columns at Uni-MoE sizes), each row masked to its own expert's r columns, then ``@ s [B[0]; ..; B[E-1]]``
  ([E*r, H']): the masked GEMM computes exactly ``s (rows A[e]) B[e]`` per row and gets autograd for free.
* The base is frozen: :class:`_FrozenGrouped` returns no weight gradient (saving the grouped ``rows^T dy``
  GEMMs); :class:`LoRAExperts` takes this path only while the base does not require grad.
* Dropped slots (``keep`` False, capacity) are computed with combine weight 0 (their expert index clamped into
  range), so the rows stay a static T*K and every grouped row belongs to an expert.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.layers.activations import apply_activation


def grouped_mm_usable(x: Tensor) -> bool:
    """Whether the per-expert-base GEMMs use ``torch._grouped_mm`` for inputs like ``x``: the fused path's own
    criterion (:func:`zoo.kernels.fused_moe.grouped_mm_available`: CUDA, bf16, sm90+, torch has it), so the
    low-rank path uses the CUTLASS grouped GEMM exactly where the fused kernel's grouped_mm backend does. False
    elsewhere (CPU, fp32, older GPUs, no Triton): the per-expert loop."""
    try:
        from zoo.kernels.fused_moe import grouped_mm_available
    except ImportError:  # pragma: no cover - zoo.kernels imports without triton; this guards a broken install
        return False
    return grouped_mm_available(x)


def _grouped(a: Tensor, w: Tensor, offs: Tensor, counts: Optional[list[int]]) -> Tensor:
    """Rows of ``a`` [N, D_in] sorted by expert times ``w[e]`` [E, D_in, D_out] -> [N, D_out]. ``offs`` [E] int32:
    cumulative row counts (``torch._grouped_mm``'s form); ``counts`` (the row counts as a list) selects the
    per-expert loop instead (where ``torch._grouped_mm`` is not usable)."""
    if counts is None:
        return torch._grouped_mm(a, w, offs=offs)
    return torch.cat([c @ w[e] for e, c in enumerate(torch.split(a, counts))])


class _FrozenGrouped(torch.autograd.Function):
    """:func:`_grouped` with a frozen ``w``: the gradient goes to ``a`` only (``dy @ w[e]^T``, grouped the same
    way); no ``a^T dy`` weight-gradient GEMMs."""

    @staticmethod
    def forward(ctx, a, w, offs, counts):
        ctx.save_for_backward(w, offs)
        ctx.counts = counts
        return _grouped(a, w, offs, counts)

    @staticmethod
    def backward(ctx, dy):
        w, offs = ctx.saved_tensors
        return _grouped(dy.contiguous(), w.transpose(-2, -1), offs, ctx.counts), None, None, None


def _mask(u: Tensor, e_row: Tensor, E: int, r: int, lead: Optional[tuple[int, int]] = None) -> Tensor:
    """``u`` [N, E*r] (every expert's A projection of each row) masked to each row's expert block -> [R, E*r], R
    the rows of ``e_row`` (int64 expert per row); ``lead = (T, K)`` when ``u`` is per token (N = T) and ``e_row``
    per slot (R = T*K): the per-token projection is broadcast over the K slots here, not recomputed."""
    onehot = F.one_hot(e_row, E).to(u.dtype)  # [R, E]
    if lead is None:
        return (u.view(-1, E, r) * onehot[:, :, None]).reshape(-1, E * r)
    T, K = lead
    return (u.view(T, 1, E, r) * onehot.view(T, K, E, 1)).reshape(-1, E * r)


def lowrank_moe(experts, x: Tensor, expert_index: Tensor, combine_weight: Tensor, keep: Tensor,
                grouped_mm: Optional[bool] = None) -> Tensor:
    """LoRA experts on routed slots without materialising per-expert weights (the dispatchers' contract).

    Args:
        experts: a :class:`zoo.moe.experts.LoRAExperts` (frozen base ``w1/b1/w2/b2``, factors ``lora_a1 [E, D, r']``,
            ``lora_b1 [E, r', H']`` (SwiGLU block mask ``_b1_mask [r', H']``), ``lora_a2 [E, H, r]``,
            ``lora_b2 [E, r, D]``, ``scaling`` s).
        x: [T, D]; ``expert_index`` / ``combine_weight`` / ``keep``: [T, K] (the fused kernel's contract).
        grouped_mm: per-expert base GEMMs with ``torch._grouped_mm`` (True) or a per-expert loop (False); None =
            :func:`grouped_mm_usable`. Unused for a shared base (dense GEMMs).
    Returns:
        ``y [T, D] = sum_k keep * combine_weight * expert_e(x[t])``, expert e:
        ``h = x W1(e) + s (x A1[e]) B1[e] (+ b1)``, ``a = act(h)``, ``y = a W2(e) + s (a A2[e]) B2[e] (+ b2)``.
        Differentiable w.r.t. ``x``, ``combine_weight``, the LoRA factors (and a shared base); NOT w.r.t. a
        per-expert base ``w1``/``w2`` (frozen by contract, see :class:`_FrozenGrouped`).
    """
    ex = experts
    T, D = x.shape
    K = expert_index.shape[1]
    E, s, dt = ex.num_experts, ex.scaling, x.dtype
    r1, r2 = ex.lora_a1.shape[2], ex.lora_a2.shape[2]
    # Concatenated factors: [E, D, r'] -> [D, E*r'] (expert e's block = columns e*r'..(e+1)*r'), [E, r', H'] ->
    # [E*r', H'] with the scale and the SwiGLU block mask folded in (tiny: E*r' rows).
    a1 = ex.lora_a1.to(dt).permute(1, 0, 2).reshape(D, E * r1)
    b1 = (s * (ex.lora_b1 * ex._b1_mask)).to(dt).reshape(E * r1, -1)
    a2 = ex.lora_a2.to(dt).permute(1, 0, 2).reshape(ex.hidden_dim, E * r2)
    b2 = (s * ex.lora_b2).to(dt).reshape(E * r2, D)
    # [T*K], slot t*K + k; a dropped slot weighs 0. keep as a fresh float copy: the product saves it for the
    # backward, and the layer's keep may live in a CUDA-graph pool (zoo.moe.compiled).
    w_slot = (combine_weight * keep.to(combine_weight.dtype)).to(dt).reshape(-1)
    e_slot = expert_index.reshape(-1).long().clamp(0, E - 1)  # [T*K]; a dropped slot's index may be out of range
    w1, w2 = ex.w1.to(dt), ex.w2.to(dt)
    if ex.per_expert_base:  # grouped base GEMMs on the slots sorted by expert
        if grouped_mm is None:
            grouped_mm = grouped_mm_usable(x)
        order = torch.argsort(e_slot, stable=True)  # [T*K] sorted row -> slot
        e_row = e_slot[order]
        counts_t = torch.bincount(e_slot, minlength=E)  # [E]
        offs = torch.cumsum(counts_t, 0, dtype=torch.int32)
        counts = None if grouped_mm else counts_t.tolist()  # the loop needs the counts on the host
        xs = x[order // K]  # [T*K, D] gathered rows
        h = torch.addmm(_FrozenGrouped.apply(xs, w1, offs, counts), _mask(xs @ a1, e_row, E, r1), b1)  # [T*K, H']
        if ex.b1 is not None:
            h = h + ex.b1.to(dt)[e_row]
        act = apply_activation(h, ex.activation)  # [T*K, H]
        o = torch.addmm(_FrozenGrouped.apply(act, w2, offs, counts), _mask(act @ a2, e_row, E, r2), b2)  # [T*K, D]
        if ex.b2 is not None:
            o = o + ex.b2.to(dt)[e_row]
        o = o * w_slot[order, None]
        o = o.new_zeros(T * K, D).index_copy(0, order, o)  # back to slot order, every slot written once
    else:  # one shared base: its first GEMM once per token, the deltas per slot
        hb = x @ w1  # [T, H']
        if ex.b1 is not None:
            hb = hb + ex.b1.to(dt)
        delta = _mask(x @ a1, e_slot, E, r1, (T, K)) @ b1  # [T*K, H']
        h = (hb.unsqueeze(1) + delta.view(T, K, -1)).view(T * K, -1)
        act = apply_activation(h, ex.activation)  # [T*K, H]
        o = torch.addmm(act @ w2, _mask(act @ a2, e_slot, E, r2), b2)  # [T*K, D]
        if ex.b2 is not None:
            o = o + ex.b2.to(dt)
        o = o * w_slot[:, None]
    return o.view(T, K, D).sum(dim=1)
