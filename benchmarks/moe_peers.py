"""Peer MoE expert implementations timed against the fused kernel by ``benchmarks/moe_layer.py``.

Every peer is a *dispatcher*: ``fn(x [T, D], expert_index [T, K], combine_weight [T, K], keep [T, K],
experts: StackedExperts) -> y [T, D]`` so that it plugs into ``zoo.moe.MoELayer.expert_dispatcher``
and the whole layer (router, grouping, aux losses, combine) is identical for every peer.
Written for this benchmark (no code copied from the peer projects); the external packages
(moe-ops, SonicMoE) are called through their public functions.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from zoo.moe.experts import StackedExperts, apply_activation
from zoo.moe.dispatch import loop_dispatch


def ours(backend: str = "triton") -> Callable:
    from zoo.kernels import fused_moe

    def fn(x, ei, cw, keep, ex: StackedExperts):
        return fused_moe(x, ei, cw, keep, ex.w1, ex.b1, ex.w2, ex.b2, ex.activation, backend=backend)

    return fn


def loop() -> Callable:
    """The per-expert Python loop (zoo's ground-truth dispatcher)."""
    return loop_dispatch


def _einsum_tensors(x, ei, cw, keep, E: int, G: int, S: int, C: int):
    """V-MoE's dense one-hot dispatch and combine tensors [G, S, E, C] (k-major buffer order per expert)."""
    K = ei.shape[1]
    oh = F.one_hot(ei.view(G, S, K), E).to(torch.int32) * keep.view(G, S, K, 1)  # [G, S, K, E]
    # position of each kept slot in its expert's buffer (k-major, then token order), < C for kept slots
    flat = oh.transpose(1, 2).reshape(G, K * S, E)
    pos = ((torch.cumsum(flat, dim=1) - 1) * flat).sum(-1).reshape(G, K, S).transpose(1, 2)  # [G, S, K]
    dispatch = x.new_zeros(G, S, E, C)
    combine = x.new_zeros(G, S, E, C)
    for k in range(K):
        pk = F.one_hot(pos[:, :, k].clamp(0, C - 1), C).to(x.dtype)  # [G, S, C]
        d = oh[:, :, k, :, None].to(x.dtype) * pk[:, :, None, :]  # [G, S, E, C]
        dispatch = dispatch + d
        combine = combine + d * cw.view(G, S, K)[:, :, k, None, None].to(x.dtype)
    return dispatch, combine


def einsum(G: int, S: int, capacity: int) -> Callable:
    """V-MoE style dense one-hot dispatch: dispatch/combine tensors [G, S, E, C] and einsums."""

    def fn(x, ei, cw, keep, ex: StackedExperts):
        T, D = x.shape
        E, C = ex.num_experts, capacity
        dispatch, combine = _einsum_tensors(x, ei, cw, keep, E, G, S, C)
        xin = torch.einsum("gsec,gsd->egcd", dispatch, x.view(G, S, D)).reshape(E, G * C, D)
        out = ex.forward_dense(xin).reshape(E, G, C, D)
        return torch.einsum("gsec,egcd->gsd", combine, out).reshape(T, D)

    return fn


# Dispatch + combine alone (identity experts): the data movement that the capacity rule decides, without the
# expert GEMMs that every implementation shares. fn(x [T, D], expert_index, combine_weight, keep, E) -> y [T, D]
# with y = sum over kept slots of combine_weight * x.
def einsum_dispatch_combine(G: int, S: int, capacity: int) -> Callable:
    """The one-hot einsum dispatch into [E, G, C, D] buffers and the einsum combine back."""

    def fn(x, ei, cw, keep, E: int):
        T, D = x.shape
        dispatch, combine = _einsum_tensors(x, ei, cw, keep, E, G, S, capacity)
        xin = torch.einsum("gsec,gsd->egcd", dispatch, x.view(G, S, D))
        return torch.einsum("gsec,egcd->gsd", combine, xin).reshape(T, D)

    return fn


def ours_dispatch_combine() -> Callable:
    """Ours: device counting sort of the kept slots by expert, gather of their rows into expert order (what the
    grouped_mm backend feeds its GEMMs; the Triton backend folds this gather into GEMM1's loads, so there it
    costs less), and the deterministic weighted combine. Calls the kernel module's internal launchers."""
    from zoo.kernels.fused_moe import _combine, _gather_rows, route

    def fn(x, ei, cw, keep, E: int):
        T, K = ei.shape
        meta = route(ei, keep, E)
        rows, _ = _gather_rows(x, meta, meta.e_row, K)
        return _combine(rows, meta.valid, T, K, x.dtype, idx=meta.slot_row, w=cw)

    return fn


def hf_grouped_mm() -> Callable:
    """Hugging Face transformers-style grouped_mm experts: argsort by expert, gather, two
    torch._grouped_mm calls with per-expert offsets, weight by routing score, index_add back."""

    def fn(x, ei, cw, keep, ex: StackedExperts):
        # like the transformers implementation it has no capacity: dropped slots are computed, weight 0
        T, D = x.shape
        K = ei.shape[1]
        E = ex.num_experts
        flat_e = ei.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat_e, torch.ones_like(flat_e, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        tok = order // K
        e_sorted = flat_e[order]
        h = torch._grouped_mm(x[tok], ex.w1.to(x.dtype), offs=offs)
        if ex.b1 is not None:
            h = h + ex.b1.to(x.dtype)[e_sorted]
        o = torch._grouped_mm(apply_activation(h, ex.activation), ex.w2.to(x.dtype), offs=offs)
        if ex.b2 is not None:
            o = o + ex.b2.to(x.dtype)[e_sorted]
        w = (cw * keep).reshape(-1)[order].to(x.dtype)
        return torch.zeros(T, D, dtype=x.dtype, device=x.device).index_add(0, tok, o * w[:, None])

    return fn


class MoeOpsPeer:
    """moe-ops (pure Triton): counting-sort permute, Triton grouped GEMMs (TMA on sm90), weighted unpermute.
    Its weight gradient needs the [E, N, K] (nn.Linear) layout, so it holds weight copies in that layout
    (same values as the layer's experts).  It has no capacity dropping: dropped slots are computed with
    weight 0."""

    def __init__(self, ex: StackedExperts):
        self.w1 = ex.w1.detach().transpose(1, 2).contiguous().requires_grad_(True)  # [E, H', D]
        self.w2 = ex.w2.detach().transpose(1, 2).contiguous().requires_grad_(True)  # [E, D, H]

    def __call__(self, x, ei, cw, keep, ex: StackedExperts):
        import moe_ops as mo

        T, D = x.shape
        K = ei.shape[1]
        E = ex.num_experts
        permuted, row_id_map, offsets = mo.permute(x, ei.to(torch.int32), E=E)
        ends = offsets[1:]
        h = mo.grouped_gemm(permuted, self.w1, ends, trans_b=True)
        if ex.b1 is not None or ex.b2 is not None:
            e_row = torch.searchsorted(ends, torch.arange(h.shape[0], device=x.device, dtype=torch.int32),
                                       right=True).clamp(max=E - 1)
        if ex.b1 is not None:
            h = h + ex.b1.to(x.dtype)[e_row]
        a = apply_activation(h, ex.activation)
        o = mo.grouped_gemm(a.contiguous(), self.w2, ends, trans_b=True)
        if ex.b2 is not None:
            o = o + ex.b2.to(x.dtype)[e_row]
        prob = (cw * keep).float()
        return mo.unpermute(o, row_id_map, prob, T, K)


class SonicPeer:
    """SonicMoE general-routing entry point (QuACK/CUTLASS grouped GEMMs); GLU activations only.
    Holds its own weight copies in SonicMoE's layout (same values as the layer's experts)."""

    def __init__(self, ex: StackedExperts):
        from sonicmoe.enums import ActivationType

        if ex.activation != "swiglu":
            raise RuntimeError("SonicMoE general routing supports GLU activations only")
        self.act = ActivationType.SWIGLU
        self.w1 = ex.w1.detach().transpose(1, 2).contiguous().requires_grad_(True)  # [E, 2H, D]
        self.w2 = ex.w2.detach().transpose(1, 2).contiguous().requires_grad_(True)  # [E, D, H]
        self.b1 = None if ex.b1 is None else ex.b1.detach().clone().requires_grad_(True)
        self.b2 = None if ex.b2 is None else ex.b2.detach().clone().requires_grad_(True)
        self.stream = torch.cuda.current_stream().cuda_stream

    def __call__(self, x, ei, cw, keep, ex: StackedExperts):
        from sonicmoe.functional import moe_general_routing_inputs

        T, K = ei.shape
        tok = torch.arange(T, device=x.device, dtype=torch.int32).repeat_interleave(K)
        scores = (cw * keep).reshape(-1).float()
        w1 = self.w1.to(x.dtype).permute(1, 2, 0)
        w2 = self.w2.to(x.dtype).permute(1, 2, 0)
        b1 = None if self.b1 is None else self.b1.to(x.dtype)
        b2 = None if self.b2 is None else self.b2.to(x.dtype)
        y, _ = moe_general_routing_inputs(x, scores, tok, ei.reshape(-1).to(torch.int32), w1, b1, w2, b2,
                                          ex.num_experts, self.stream, self.act, False, True)
        return y


class DeepSpeedTop2MoE(torch.nn.Module):
    """MoE-LLaVA's MoE layer as it runs in the official code (DeepSpeed 0.9.5 ``MOELayer`` with ``top2gating`` and its
    one-hot einsum dispatch), written here as a benchmark peer: a drop-in replacement for a zoo ``MoELayer``
    (``forward(x [B, S, D], mask=None, modality=None) -> [B, S, D]``) holding the same router and expert weights.

    The algorithm, as DeepSpeed 0.9.5 computes it: all B*S tokens of the call form ONE group; gates = softmax of the
    fp32 router logits; expert 1 = argmax, expert 2 = argmax of the logits with expert 1 masked (DeepSpeed adds Gumbel
    noise there, also in eval; off here unless ``second_expert_noise``, the zoo's default being deterministic);
    capacity = ceil(T / E * capacity_factor * 2), at least ``min_capacity``; slots are taken in token order, all first
    choices before any second choice; the two kept gates are renormalised to sum 1; dense ``[T, E, C]`` combine and
    dispatch tensors; ``einsum("sec,sm->ecm")`` dispatch, each expert on its buffer, ``einsum("sec,ecm->sm")`` combine.
    ``l_aux`` = E * mean over experts of (mean gate prob * fraction of first choices), the GShard loss. Padding is
    routed like any token (DeepSpeed has no mask)."""

    def __init__(self, layer, capacity_factor: float = 1.5, min_capacity: int = 4,
                 second_expert_noise: bool = False) -> None:
        super().__init__()
        self.router_weight = layer.router.proj.weight  # [E, D], shared with the zoo layer (same values)
        self.experts = layer.experts
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.second_expert_noise = second_expert_noise
        self.l_aux = None

    def forward(self, x, mask=None, modality=None):
        B, S, D = x.shape
        tokens = x.reshape(-1, D)
        T = tokens.shape[0]
        logits = F.linear(tokens.float(), self.router_weight.float())  # router in fp32, as MoE-LLaVA
        E = logits.shape[1]
        gates = F.softmax(logits, dim=1)
        idx1 = gates.argmax(dim=1)
        mask1 = F.one_hot(idx1, E)
        second = logits
        if self.second_expert_noise:
            u = torch.rand_like(logits)
            second = logits - torch.log(-torch.log(u))
        idx2 = second.masked_fill(mask1.bool(), float("-inf")).argmax(dim=1)
        mask2 = F.one_hot(idx2, E)
        capacity = max(math.ceil(T / E * self.capacity_factor * 2), self.min_capacity)
        loc1 = torch.cumsum(mask1, dim=0) - 1
        loc2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
        self.l_aux = (gates.mean(0) * mask1.float().mean(0)).sum() * E
        mask1 = mask1 * (loc1 < capacity)
        mask2 = mask2 * (loc2 < capacity)
        pos1 = (loc1 * mask1).sum(1)
        pos2 = (loc2 * mask2).sum(1)
        g1 = (gates * mask1).sum(1)
        g2 = (gates * mask2).sum(1)
        denom = (g1 + g2).clamp_min(torch.finfo(gates.dtype).eps)
        g1, g2 = g1 / denom, g2 / denom
        combine = (g1[:, None, None] * mask1[:, :, None] * F.one_hot(pos1, capacity)[:, None, :]
                   + g2[:, None, None] * mask2[:, :, None] * F.one_hot(pos2, capacity)[:, None, :])  # [T, E, C]
        dispatch = combine.bool().to(x.dtype)
        buffers = torch.einsum("sec,sm->ecm", dispatch, tokens)  # [E, C, D]
        out = torch.stack([self.experts.expert(e, buffers[e]) for e in range(E)])  # each expert on its buffer
        return torch.einsum("sec,ecm->sm", combine.to(x.dtype), out).reshape(B, S, D)


class IdealTop2Experts(torch.nn.Module):
    """A reference cost of a top-2 MoE layer, for the step benchmark (not a correct MoE): every token's two expert
    passes as plain GEMMs, as if the routing were perfectly balanced and already sorted. Not a floor: fused kernels
    beat its autograd backward (``benchmarks/results/moe_llava_step.md``, session 14). The ``2T`` rows (each token twice)
    are cut into ``E`` equal chunks, chunk e goes through expert e in one GEMM (every expert gets rows, so every
    expert gets gradients and optimizer work as in a real layer), and each token's two results are averaged. Only the
    router's fp32 logits are computed (and unused) beside it: no top-k, no capacity, no permutation, no loss.
    ``forward(x [B, S, D], mask=None, modality=None) -> [B, S, D]`` like the layer it replaces."""

    def __init__(self, layer) -> None:
        super().__init__()
        self.router_weight = layer.router.proj.weight  # [E, D]
        self.experts = layer.experts
        self.num_experts = self.router_weight.shape[0]

    def forward(self, x, mask=None, modality=None):
        B, S, D = x.shape
        tokens = x.reshape(-1, D)
        T = tokens.shape[0]
        F.linear(tokens.float(), self.router_weight.float())  # the router's GEMM, as every layer pays it
        rows = torch.cat([tokens, tokens]).chunk(self.num_experts)  # [2T, D] in E near-equal chunks
        out = torch.cat([self.experts.expert(e, r) for e, r in enumerate(rows)])
        return (0.5 * (out[:T] + out[T:])).reshape(B, S, D)


class FreeMoE(torch.nn.Module):
    """A stand-in that makes an MoE layer cost (almost) nothing, for the step benchmark's ceiling (not an MoE):
    ``x * gain`` with one trainable scalar ``gain`` (0 at the start). The layer's experts and router are gone (no
    expert GEMMs, no routing, no loss, no optimizer update of theirs), but the backward still runs through every
    block above the first MoE layer, as it does with a real layer, because ``gain`` trains. A step with these in
    place of the MoE layers is what any MoE implementation would cost if its layers took no time: the official
    algorithm's step / this step bounds the speed-up over it that MoE-layer work alone can give.
    ``forward(x [B, S, D], mask=None, modality=None) -> [B, S, D]`` like the layer it replaces."""

    def __init__(self, layer) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.zeros((), device=layer.router.proj.weight.device,
                                                   dtype=layer.router.proj.weight.dtype))

    def forward(self, x, mask=None, modality=None):
        return x * self.gain


def replace_moe_layers(model, peer: Callable, **kwargs) -> int:
    """Swap every zoo ``MoELayer`` of ``model`` for ``peer(layer, **kwargs)`` (:class:`DeepSpeedTop2MoE`,
    :class:`IdealTop2Experts`, :class:`FreeMoE`), holding the same weights; returns how many were swapped."""
    from zoo.moe import MoELayer

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoELayer):
                setattr(parent, name, peer(child, **kwargs))
                swapped += 1
    return swapped


def deepspeed_aux_loss(model):
    terms = [m.l_aux for m in model.modules() if isinstance(m, DeepSpeedTop2MoE) and m.l_aux is not None]
    return sum(terms) if terms else None
