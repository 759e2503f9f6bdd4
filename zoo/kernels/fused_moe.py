"""Fused GPU Mixture-of-Experts expert path (forward and backward) in Triton.

Contract (same as the reference dispatchers in ``zoo.moe.dispatch``)::

    fused_moe(x [T, D], expert_index [T, K] int, combine_weight [T, K] float, keep [T, K] bool,
              w1 [E, D, H] (swiglu: [E, D, 2H], gate columns first, then up), b1 [E, H|2H] | None,
              w2 [E, H, D], b2 [E, D] | None, activation "gelu_tanh" | "swiglu") -> y [T, D]
    y[t] = sum_k keep[t,k] * cw[t,k] * (act(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e]),  e = expert_index[t,k]

Differentiable w.r.t. x, combine_weight, w1, b1, w2, b2.  Output dtype = x dtype; all matmuls
accumulate in fp32 (fp32 inputs use tf32 tensor-core dots).  Weights are cast to x's dtype.

Pipeline (no host synchronisation anywhere: no .item(), no .tolist(), all schedules on device)

1. Routing metadata, a stable counting sort on device (three Triton kernels, no torch glue: every launch
   costs host time, and small layers are launch-bound): slots s = t*K + k are bucketed by expert (dropped /
   masked slots go to a last bucket), giving ``sorted_slot`` (a permutation of the T*K slots, stable), the
   expert of each sorted row, per-expert ``counts`` and ``starts``, and the slots' valid flags.
2. GEMM1 (grouped): each program owns a BLOCK_M tile of one expert's rows; the expert of a tile is
   derived inside the kernel from ``counts`` (a cumsum of per-expert tile counts), so the grid is
   the static bound ceil(T*K/BLOCK_M) + E tiles and surplus programs exit at once.  Rows of x are
   loaded by token index inside the kernel (no gathered copy).  Bias + activation in the epilogue.
3. GEMM2 (grouped): act @ w2[e] + b2[e], times the combine weight in the epilogue, each row stored
   at its slot position of a per-slot buffer [T*K, D].
4. Combine: y[t] = sum over k (fixed order, fp32) of the kept slots: deterministic, no atomics.

Backward (all deterministic, no float atomics, no split-K):
  * dA   = dy[tok] @ w2[e]^T (gathered rows of dy), epilogue: d(combine_weight) partial row-dots
           <dA_unweighted, act> per N tile (summed in fixed order afterwards, plus <dy, b2[e]>),
           scaling by the combine weight and the activation derivative -> dh.
  * dX   = dh @ w1[e]^T scattered to the per-slot buffer, then the fixed-order combine over K.
  * dW1[e] = x[tok]^T @ dh and dW2[e] = act^T @ (cw * dy[tok]): one program per output tile
           that loops over all of expert e's rows (gathered by index); bias grads alongside.

A second expert-GEMM backend uses ``torch._grouped_mm`` (CUTLASS grouped GEMM, bf16 on sm90+) with the same
metadata, gathered copies and small Triton helper kernels (bias+activation, activation backward,
gather+scale+d(combine_weight), segment sums, zeroing of empty experts' weight gradients, combine). Its backward
is faster than the Triton one at every benchmarked shape once launches are not the bottleneck (CUDA graphs), so
``backend="auto"`` on sm90 runs the Triton forward with the grouped_mm backward ("hybrid"), or grouped_mm throughout
for large SwiGLU experts (:func:`auto_backend`).

The Triton kernels also run on CPU under ``TRITON_INTERPRET=1`` (used by the CPU tests); there the
tensor-core dot is done on operands upcast to fp32, because the interpreter's bf16 dot is broken.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

ACTIVATIONS = ("gelu_tanh", "swiglu")  # what the kernels implement (formulas: zoo.layers.activations)

try:  # triton is optional at import time: fused_moe_available() reports False without it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    _HAS_TRITON = False

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_moe_available(x: Tensor) -> bool:
    """True when ``fused_moe`` can run on ``x``: Triton importable, a supported dtype (bf16, fp16, fp32) and a
    CUDA tensor (or any tensor under ``TRITON_INTERPRET=1``, where the kernels run on CPU)."""
    return bool(_HAS_TRITON and isinstance(x, Tensor) and (x.is_cuda or _interpret())
                and x.dtype in _SUPPORTED_DTYPES)


def grouped_mm_available(x: Tensor) -> bool:
    """True when the torch._grouped_mm backend can run: CUDA, bf16, sm90+, torch has _grouped_mm."""
    if not (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16):
        return False
    return _sm_major(x.device) >= 9


_SM_MAJOR: Dict[int, int] = {}


@torch.compiler.assume_constant_result  # a constant to torch.compile: no guard on the cache, no recompilation
def _sm_major(device: torch.device) -> int:
    """Compute capability major of a CUDA device, read once."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_MAJOR:
        _SM_MAJOR[index] = torch.cuda.get_device_capability(index)[0]
    return _SM_MAJOR[index]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if _HAS_TRITON:

    @triton.jit
    def _dot(a, b, acc, UPCAST: tl.constexpr, TF32: tl.constexpr):
        if UPCAST:  # interpreter: its bf16/fp16 dot is wrong, do it in fp32
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif TF32:
            return tl.dot(a, b, acc, input_precision="tf32")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _rows_matmul(a_ptrs, b_ptrs, rmask, nmask, offs_k, KD, stride_bk,
                     UPCAST: tl.constexpr, TF32: tl.constexpr, EVEN_K: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """[BM, BN] fp32 tile of A @ B over K = KD: rows of A at ``a_ptrs`` (unit stride along K, rows masked by
        ``rmask``), B at ``b_ptrs`` (``stride_bk`` along K, columns masked by ``nmask``); the one K loop of the
        grouped GEMMs (GEMM1 keeps its own: with SwiGLU it feeds two accumulators from one load of A)."""
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, KD, BK):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=nmask[None, :], other=0.0)
            else:
                km = offs_k < KD - k0
                a = tl.load(a_ptrs, mask=rmask[:, None] & km[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=km[:, None] & nmask[None, :], other=0.0)
            acc = _dot(a, b, acc, UPCAST, TF32)
            a_ptrs += BK
            b_ptrs += BK * stride_bk
        return acc

    @triton.jit
    def _gelu_tanh(h):
        # 0.5 h (1 + tanh(c (h + 0.044715 h^3))), tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        return h * tl.sigmoid(2.0 * u)

    @triton.jit
    def _gelu_tanh_grad(h):
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        th = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
        return 0.5 * (1.0 + th) + 0.5 * h * (1.0 - th * th) * du

    @triton.jit
    def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
        width = GROUP_M * num_n
        group = pid // width
        first_m = group * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gsize
        pid_n = (pid % width) // gsize
        return pid_m, pid_n

    @triton.jit
    def _tile_schedule(pid_m, counts_ptr, starts_ptr, E, E_PAD: tl.constexpr, BM: tl.constexpr):
        """Map a global M-tile index to (expert, first sorted row, end row of that expert).
        Experts own ceil(count/BM) consecutive tiles; returns e == E for surplus tiles."""
        ar = tl.arange(0, E_PAD)
        emask = ar < E
        cnt = tl.load(counts_ptr + ar, mask=emask, other=0)
        st = tl.load(starts_ptr + ar, mask=emask, other=0)
        tiles = (cnt + BM - 1) // BM
        cum = tl.cumsum(tiles, axis=0)
        e = tl.sum((cum <= pid_m).to(tl.int32), axis=0)
        sel = ar == e
        first = tl.sum(tl.where(sel, cum - tiles, 0), axis=0)
        cnt_e = tl.sum(tl.where(sel, cnt, 0), axis=0)
        start_e = tl.sum(tl.where(sel, st, 0), axis=0)
        row0 = start_e + (pid_m - first) * BM
        return e, row0, start_e + cnt_e

    # ---------------- routing: stable counting sort ----------------
    # Slots are bucketed by expert (bucket E: dropped, masked or out-of-range slots). Each program owns NSUB * SB
    # consecutive slots. Three launches and no torch glue: histogram per program, one program that scans the
    # histograms into per-program bucket offsets (plus per-bucket counts and starts), stable scatter.
    @triton.jit
    def _slot_bucket(e, v, m, E, E_PAD: tl.constexpr):
        """Bucket of each slot: its expert if valid, E if dropped, E_PAD (none) for lanes past the end."""
        b = tl.where(v, e.to(tl.int32), E)
        return tl.where(m, b, E_PAD)

    @triton.jit
    def _route_hist_kernel(eidx_ptr, keep_ptr, valid_ptr, hist_ptr, TK, E,
                           E_PAD: tl.constexpr, SB: tl.constexpr, NSUB: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, E_PAD)
        h = tl.zeros((E_PAD,), dtype=tl.int32)
        for i in range(NSUB):
            offs = (pid * NSUB + i) * SB + tl.arange(0, SB)
            m = offs < TK
            e = tl.load(eidx_ptr + offs, mask=m, other=0)
            kp = tl.load(keep_ptr + offs, mask=m, other=0)
            v = (kp != 0) & (e >= 0) & (e < E) & m
            tl.store(valid_ptr + offs, v.to(tl.uint8), mask=m)
            b = _slot_bucket(e, v, m, E, E_PAD)
            h += tl.sum((b[:, None] == cols[None, :]).to(tl.int32), axis=0)
        tl.store(hist_ptr + pid * E_PAD + cols, h)

    @triton.jit
    def _route_scan_kernel(hist_ptr, cs_ptr, NB, E_PAD: tl.constexpr, RB: tl.constexpr):
        """One program: hist [NB, E_PAD] -> exclusive prefix over programs (in place); cs = [counts, starts]."""
        cols = tl.arange(0, E_PAD)
        carry = tl.zeros((E_PAD,), dtype=tl.int32)
        for r0 in range(0, NB, RB):
            rows = r0 + tl.arange(0, RB)
            m = (rows < NB)[:, None]
            ptrs = hist_ptr + rows[:, None] * E_PAD + cols[None, :]
            h = tl.load(ptrs, mask=m, other=0)
            tl.store(ptrs, tl.cumsum(h, axis=0) - h + carry[None, :], mask=m)
            carry += tl.sum(h, axis=0)
        tl.store(cs_ptr + cols, carry)
        tl.store(cs_ptr + E_PAD + cols, tl.cumsum(carry, axis=0) - carry)

    @triton.jit
    def _route_scatter_kernel(eidx_ptr, valid_ptr, base_ptr, cs_ptr, sorted_ptr, erow_ptr, slot_row_ptr, TK, E,
                              E_PAD: tl.constexpr, SB: tl.constexpr, NSUB: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, E_PAD)
        nxt = tl.load(base_ptr + pid * E_PAD + cols) + tl.load(cs_ptr + E_PAD + cols)  # next free row per bucket
        for i in range(NSUB):
            offs = (pid * NSUB + i) * SB + tl.arange(0, SB)
            m = offs < TK
            e = tl.load(eidx_ptr + offs, mask=m, other=0)
            v = tl.load(valid_ptr + offs, mask=m, other=0) != 0
            b = _slot_bucket(e, v, m, E, E_PAD)
            onehot = (b[:, None] == cols[None, :]).to(tl.int32)
            dest = tl.sum((tl.cumsum(onehot, axis=0) - 1 + nxt[None, :]) * onehot, axis=1)  # stable
            tl.store(sorted_ptr + dest, offs, mask=m)
            tl.store(erow_ptr + dest, b, mask=m)
            tl.store(slot_row_ptr + offs, dest, mask=m)
            nxt += tl.sum(onehot, axis=0)

    # ---------------- forward GEMM1: gather + grouped GEMM + bias + activation ----------------
    @triton.jit
    def _gemm1_kernel(x_ptr, w_ptr, b_ptr, hpre_ptr, act_ptr, slot_ptr, counts_ptr, starts_ptr,
                      D, H, K_TOP, E, num_m,
                      stride_xt, stride_we, stride_wd, stride_wh, stride_be, stride_hr, stride_ar,
                      SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_HPRE: tl.constexpr,
                      UPCAST: tl.constexpr, TF32: tl.constexpr, EVEN_K: tl.constexpr,
                      E_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_n = tl.cdiv(H, BN)
        pid_m, pid_n = _swizzle(pid, num_m, num_n, GROUP_M)
        e, row0, row_end = _tile_schedule(pid_m, counts_ptr, starts_ptr, E, E_PAD, BM)
        if e >= E:
            return
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row_end
        slot = tl.load(slot_ptr + rows, mask=rmask, other=0)
        tok = (slot // K_TOP).to(tl.int64)
        offs_k = tl.arange(0, BK)
        offs_n = pid_n * BN + tl.arange(0, BN)
        nmask = offs_n < H
        a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
        w_base = w_ptr + e.to(tl.int64) * stride_we
        b_ptrs = w_base + offs_k[:, None] * stride_wd + offs_n[None, :] * stride_wh
        bu_ptrs = b_ptrs + H * stride_wh
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, D, BK):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=nmask[None, :], other=0.0)
            else:
                km = offs_k < D - k0
                a = tl.load(a_ptrs, mask=rmask[:, None] & km[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=km[:, None] & nmask[None, :], other=0.0)
            acc = _dot(a, b, acc, UPCAST, TF32)
            if SWIGLU:
                if EVEN_K:
                    bu = tl.load(bu_ptrs, mask=nmask[None, :], other=0.0)
                else:
                    bu = tl.load(bu_ptrs, mask=km[:, None] & nmask[None, :], other=0.0)
                acc_u = _dot(a, bu, acc_u, UPCAST, TF32)
                bu_ptrs += BK * stride_wd
            a_ptrs += BK
            b_ptrs += BK * stride_wd
        if HAS_BIAS:
            bb = b_ptr + e.to(tl.int64) * stride_be
            acc += tl.load(bb + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
            if SWIGLU:
                acc_u += tl.load(bb + H + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        rows64 = rows.to(tl.int64)
        omask = rmask[:, None] & nmask[None, :]
        if STORE_HPRE:
            hp = hpre_ptr + rows64[:, None] * stride_hr + offs_n[None, :]
            tl.store(hp, acc.to(hpre_ptr.dtype.element_ty), mask=omask)
            if SWIGLU:
                tl.store(hp + H, acc_u.to(hpre_ptr.dtype.element_ty), mask=omask)
        if SWIGLU:
            out = acc * tl.sigmoid(acc) * acc_u
        else:
            out = _gelu_tanh(acc)
        tl.store(act_ptr + rows64[:, None] * stride_ar + offs_n[None, :], out.to(act_ptr.dtype.element_ty),
                 mask=omask)

    # ---------------- grouped GEMM over sorted rows, scattered to slot rows ----------------
    # forward GEMM2 (act @ w2[e] + b2[e]) * cw   and   backward dX (dh @ w1[e]^T)
    @triton.jit
    def _gemm_scatter_kernel(a_ptr, w_ptr, b_ptr, cw_ptr, out_ptr, slot_ptr, counts_ptr, starts_ptr,
                             KD, N, E, num_m, k_chunk,
                             stride_ar, stride_we, stride_wk, stride_wn, stride_be, stride_or, stride_os,
                             HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr,
                             UPCAST: tl.constexpr, TF32: tl.constexpr, EVEN_K: tl.constexpr,
                             E_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                             GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BN)
        pid_m, pid_n = _swizzle(pid, num_m, num_n, GROUP_M)
        e, row0, row_end = _tile_schedule(pid_m, counts_ptr, starts_ptr, E, E_PAD, BM)
        if e >= E:
            return
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row_end
        rows64 = rows.to(tl.int64)
        offs_k = tl.arange(0, BK)
        offs_n = pid_n * BN + tl.arange(0, BN)
        nmask = offs_n < N
        slot = tl.load(slot_ptr + rows, mask=rmask, other=0)
        optrs = out_ptr + slot.to(tl.int64)[:, None] * stride_or + offs_n[None, :]
        # SPLIT_K a constexpr: the unsplit kernel (training, prefill) compiles to the code it had before split-K,
        # without the split's runtime K bound and int64 K offsets (a suspect when session 15's MoE-LLaVA step ran
        # 108 ms against session 14's 89; the step stayed as slow and as noisy with this, so that was not it).
        if SPLIT_K:
            # Program (., s) sums K rows [s * k_chunk, (s + 1) * k_chunk) into partial s of out (stride_os apart;
            # the caller adds the partials in a fixed order).
            pid_s = tl.program_id(1)
            k0 = pid_s * k_chunk
            a_ptrs = a_ptr + rows64[:, None] * stride_ar + (k0 + offs_k)[None, :]
            b_ptrs = (w_ptr + e.to(tl.int64) * stride_we + (k0 + offs_k)[:, None].to(tl.int64) * stride_wk
                      + offs_n[None, :] * stride_wn)
            acc = _rows_matmul(a_ptrs, b_ptrs, rmask, nmask, offs_k, tl.minimum(k_chunk, KD - k0), stride_wk,
                               UPCAST, TF32, EVEN_K, BM, BN, BK)
            optrs += pid_s.to(tl.int64) * stride_os
        else:
            a_ptrs = a_ptr + rows64[:, None] * stride_ar + offs_k[None, :]
            b_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
            acc = _rows_matmul(a_ptrs, b_ptrs, rmask, nmask, offs_k, KD, stride_wk, UPCAST, TF32, EVEN_K, BM, BN, BK)
        if HAS_BIAS:
            if not SPLIT_K or tl.program_id(1) == 0:
                acc += tl.load(b_ptr + e.to(tl.int64) * stride_be + offs_n, mask=nmask,
                               other=0.0).to(tl.float32)[None, :]
        if HAS_CW:
            cw = tl.load(cw_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
            acc = acc * cw[:, None]
        tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])

    # ---------------- backward: dA = dy[tok] @ w2[e]^T, d(cw), activation backward ----------------
    @triton.jit
    def _bwd_act_kernel(dy_ptr, w_ptr, b2_ptr, act_ptr, hpre_ptr, cw_ptr, dh_ptr, dcw_ptr,
                        slot_ptr, counts_ptr, starts_ptr,
                        D, H, K_TOP, E, num_m, TK,
                        stride_dyt, stride_we, stride_wh, stride_wd, stride_be,
                        stride_ar, stride_hr, stride_dhr,
                        SWIGLU: tl.constexpr, HAS_B2: tl.constexpr,
                        UPCAST: tl.constexpr, TF32: tl.constexpr, EVEN_K: tl.constexpr,
                        E_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_n = tl.cdiv(H, BN)
        pid_m, pid_n = _swizzle(pid, num_m, num_n, GROUP_M)
        e, row0, row_end = _tile_schedule(pid_m, counts_ptr, starts_ptr, E, E_PAD, BM)
        if e >= E:
            return
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row_end
        rows64 = rows.to(tl.int64)
        slot = tl.load(slot_ptr + rows, mask=rmask, other=0)
        tok = (slot // K_TOP).to(tl.int64)
        offs_k = tl.arange(0, BK)
        offs_n = pid_n * BN + tl.arange(0, BN)
        nmask = offs_n < H
        a_ptrs = dy_ptr + tok[:, None] * stride_dyt + offs_k[None, :]
        # B[k, n] = w2[e, n, k]
        b_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wd + offs_n[None, :] * stride_wh
        acc = _rows_matmul(a_ptrs, b_ptrs, rmask, nmask, offs_k, D, stride_wd, UPCAST, TF32, EVEN_K, BM, BN, BK)
        omask = rmask[:, None] & nmask[None, :]
        act = tl.load(act_ptr + rows64[:, None] * stride_ar + offs_n[None, :], mask=omask, other=0.0).to(tl.float32)
        part = tl.sum(acc * act, axis=1)
        if HAS_B2:
            bd = tl.zeros((BM,), dtype=tl.float32)
            if pid_n == 0:  # <dy[t], b2[e]> once per row
                bb = b2_ptr + e.to(tl.int64) * stride_be
                for k0 in range(0, D, BK):
                    km = offs_k < D - k0
                    dyt = tl.load(dy_ptr + tok[:, None] * stride_dyt + (k0 + offs_k)[None, :],
                                  mask=rmask[:, None] & km[None, :], other=0.0).to(tl.float32)
                    bv = tl.load(bb + k0 + offs_k, mask=km, other=0.0).to(tl.float32)
                    bd += tl.sum(dyt * bv[None, :], axis=1)
            part += bd
        tl.store(dcw_ptr + pid_n.to(tl.int64) * TK + slot, part, mask=rmask)
        cw = tl.load(cw_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
        g = acc * cw[:, None]
        hp_ptrs = hpre_ptr + rows64[:, None] * stride_hr + offs_n[None, :]
        dh_ptrs = dh_ptr + rows64[:, None] * stride_dhr + offs_n[None, :]
        hg = tl.load(hp_ptrs, mask=omask, other=0.0).to(tl.float32)
        if SWIGLU:
            hu = tl.load(hp_ptrs + H, mask=omask, other=0.0).to(tl.float32)
            sg = tl.sigmoid(hg)
            dgate = g * hu * sg * (1.0 + hg * (1.0 - sg))
            dup = g * hg * sg
            tl.store(dh_ptrs, dgate.to(dh_ptr.dtype.element_ty), mask=omask)
            tl.store(dh_ptrs + H, dup.to(dh_ptr.dtype.element_ty), mask=omask)
        else:
            tl.store(dh_ptrs, (g * _gelu_tanh_grad(hg)).to(dh_ptr.dtype.element_ty), mask=omask)

    # ---------------- backward: per-expert weight gradients (no split-K) ----------------
    # out[e] [M, N] = sum over rows r of expert e: A_r[m] * B_r[n]
    #   dW1: A_r = x[tok_r] (gathered), B_r = dh[r]               (M = D,  N = H or 2H)
    #   dW2: A_r = act[r],             B_r = cw_r * dy[tok_r]    (M = H,  N = D)
    @triton.jit
    def _wgrad_kernel(a_ptr, b_ptr, cw_ptr, out_ptr, db_ptr, slot_ptr, counts_ptr, starts_ptr,
                      M, N, K_TOP, E,
                      stride_ar, stride_br, stride_oe, stride_om, stride_on, stride_dbe,
                      GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE_B: tl.constexpr,
                      HAS_DB: tl.constexpr, UPCAST: tl.constexpr, TF32: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        per_e = num_m * num_n
        e = pid // per_e
        pid_m, pid_n = _swizzle(pid % per_e, num_m, num_n, GROUP_M)
        cnt = tl.load(counts_ptr + e)
        start = tl.load(starts_ptr + e)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mmask = offs_m < M
        nmask = offs_n < N
        offs_r = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for r0 in range(0, cnt, BK):
            rm = r0 + offs_r < cnt
            rows = start + r0 + offs_r
            if GATHER_A or GATHER_B or SCALE_B:
                slot = tl.load(slot_ptr + rows, mask=rm, other=0)
            if GATHER_A:
                ra = (slot // K_TOP).to(tl.int64) * stride_ar
            else:
                ra = rows.to(tl.int64) * stride_ar
            if GATHER_B:
                rb = (slot // K_TOP).to(tl.int64) * stride_br
            else:
                rb = rows.to(tl.int64) * stride_br
            a = tl.load(a_ptr + ra[None, :] + offs_m[:, None], mask=mmask[:, None] & rm[None, :], other=0.0)
            b = tl.load(b_ptr + rb[:, None] + offs_n[None, :], mask=rm[:, None] & nmask[None, :], other=0.0)
            if SCALE_B:
                cw = tl.load(cw_ptr + slot, mask=rm, other=0.0).to(tl.float32)
                b = (b.to(tl.float32) * cw[:, None]).to(a.dtype)
            acc = _dot(a, b, acc, UPCAST, TF32)
        optrs = out_ptr + e.to(tl.int64) * stride_oe + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
        if HAS_DB:
            if pid_m == 0:
                dbacc = tl.zeros((BN,), dtype=tl.float32)
                for r0 in range(0, cnt, BK):
                    rm = r0 + offs_r < cnt
                    rows = start + r0 + offs_r
                    if GATHER_B or SCALE_B:
                        slot = tl.load(slot_ptr + rows, mask=rm, other=0)
                    if GATHER_B:
                        rb = (slot // K_TOP).to(tl.int64) * stride_br
                    else:
                        rb = rows.to(tl.int64) * stride_br
                    b = tl.load(b_ptr + rb[:, None] + offs_n[None, :], mask=rm[:, None] & nmask[None, :],
                                other=0.0).to(tl.float32)
                    if SCALE_B:
                        cw = tl.load(cw_ptr + slot, mask=rm, other=0.0).to(tl.float32)
                        b = b * cw[:, None]
                    dbacc += tl.sum(b, axis=0)
                tl.store(db_ptr + e.to(tl.int64) * stride_dbe + offs_n, dbacc.to(db_ptr.dtype.element_ty), mask=nmask)

    # ---------------- combine: y[t] = sum_k valid[t,k] * (src[row(t,k)] (+ b[e]) ) (* w[t,k]) ----------------
    @triton.jit
    def _combine_kernel(src_ptr, idx_ptr, valid_ptr, w_ptr, e_ptr, bias_ptr, out_ptr,
                        T, D, stride_sr, stride_be, stride_ot, stride_ss,
                        K_TOP: tl.constexpr, HAS_IDX: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BT: tl.constexpr, BD: tl.constexpr, SPLIT: tl.constexpr):
        """y[t] = sum over k = 0..K-1 (fixed order, fp32) of valid[t,k] * (src[row(t,k)] (+ b[e])) (* w[t,k]);
        row(t,k) = t*K+k, or idx[t*K+k] (rows in sorted order).  Invalid slots are never read. ``SPLIT`` > 1: src
        is [SPLIT, rows, D] split-K partials (``stride_ss`` apart), each slot's row their sum in order 0..SPLIT-1."""
        pid_t = tl.program_id(0)
        pid_d = tl.program_id(1)
        toks = pid_t * BT + tl.arange(0, BT)
        tm = toks < T
        toks64 = toks.to(tl.int64)
        cols = pid_d * BD + tl.arange(0, BD)
        cm = cols < D
        acc = tl.zeros((BT, BD), dtype=tl.float32)
        for k in tl.static_range(K_TOP):
            s = toks64 * K_TOP + k
            v = tl.load(valid_ptr + s, mask=tm, other=0) != 0
            if HAS_IDX:
                r = tl.load(idx_ptr + s, mask=tm, other=0).to(tl.int64)
            else:
                r = s
            m2 = v[:, None] & cm[None, :]
            val = tl.load(src_ptr + r[:, None] * stride_sr + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            for sp in tl.static_range(1, SPLIT):
                val += tl.load(src_ptr + sp * stride_ss + r[:, None] * stride_sr + cols[None, :], mask=m2,
                               other=0.0).to(tl.float32)
            if HAS_BIAS:
                ee = tl.load(e_ptr + s, mask=tm & v, other=0).to(tl.int64)
                val += tl.load(bias_ptr + ee[:, None] * stride_be + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_W:
                wv = tl.load(w_ptr + s, mask=tm & v, other=0.0).to(tl.float32)
                val = val * wv[:, None]
            acc += val
        tl.store(out_ptr + toks64[:, None] * stride_ot + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=tm[:, None] & cm[None, :])

    # ---------------- grouped_mm backend helpers ----------------
    @triton.jit
    def _bias_act_kernel(h_ptr, e_ptr, b_ptr, act_ptr, R, H, stride_hr, stride_be, stride_ar,
                         SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, E,
                         BR: tl.constexpr, BH: tl.constexpr):
        """In place h += b[e_row]; act = activation(h).  Rows with e_row >= E are left alone."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BH + tl.arange(0, BH)
        ee = tl.load(e_ptr + rows, mask=rows < R, other=E)
        rm = (rows < R) & (ee < E)
        m = rm[:, None] & (cols < H)[None, :]
        rows64 = rows.to(tl.int64)
        hp = h_ptr + rows64[:, None] * stride_hr + cols[None, :]
        g = tl.load(hp, mask=m, other=0.0).to(tl.float32)
        if SWIGLU:
            u = tl.load(hp + H, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bp = b_ptr + ee.to(tl.int64)[:, None] * stride_be + cols[None, :]
            g += tl.load(bp, mask=m, other=0.0).to(tl.float32)
            tl.store(hp, g.to(h_ptr.dtype.element_ty), mask=m)
            if SWIGLU:
                u += tl.load(bp + H, mask=m, other=0.0).to(tl.float32)
                tl.store(hp + H, u.to(h_ptr.dtype.element_ty), mask=m)
        if SWIGLU:
            out = g * tl.sigmoid(g) * u
        else:
            out = _gelu_tanh(g)
        tl.store(act_ptr + rows64[:, None] * stride_ar + cols[None, :], out.to(act_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _gather_rows_kernel(src_ptr, slot_ptr, cw_ptr, e_ptr, out_u_ptr, out_s_ptr, R, D, K_TOP, E,
                            stride_src, stride_u, stride_s,
                            WRITE_U: tl.constexpr, WRITE_S: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
        """Sorted row r: out_u[r] = src[slot_r // K], out_s[r] = cw[slot_r] * src[slot_r // K] for kept rows,
        zeros for the rows past the kept ones (so that no garbage reaches a GEMM)."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        ee = tl.load(e_ptr + rows, mask=rows < R, other=E)
        rm = (rows < R) & (ee < E)
        slot = tl.load(slot_ptr + rows, mask=rm, other=0)
        tok = (slot // K_TOP).to(tl.int64)
        m = rm[:, None] & (cols < D)[None, :]
        sm = (rows < R)[:, None] & (cols < D)[None, :]
        v = tl.load(src_ptr + tok[:, None] * stride_src + cols[None, :], mask=m, other=0.0)
        rows64 = rows.to(tl.int64)
        if WRITE_U:
            tl.store(out_u_ptr + rows64[:, None] * stride_u + cols[None, :], v.to(out_u_ptr.dtype.element_ty), mask=sm)
        if WRITE_S:
            cw = tl.load(cw_ptr + slot, mask=rm, other=0.0).to(tl.float32)
            tl.store(out_s_ptr + rows64[:, None] * stride_s + cols[None, :],
                     (v.to(tl.float32) * cw[:, None]).to(out_s_ptr.dtype.element_ty), mask=sm)

    @triton.jit
    def _dact_rows_kernel(dA_ptr, act_ptr, hpre_ptr, du_ptr, b2_ptr, cw_ptr, slot_ptr, e_ptr, dh_ptr, dcw_ptr,
                          R, H, D, E, stride_dA, stride_act, stride_h, stride_du, stride_be, stride_dh,
                          SWIGLU: tl.constexpr, HAS_B2: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr):
        """Row-wise backward of combine weight and activation from the unweighted dA = dy[tok] @ w2[e]^T:
        dcw[slot] = <dA, act> + <dy[tok], b2[e]> (whole row per program: fixed order), dh = cw * dA * act'(h).
        Rows past the kept ones get dh = 0."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        ee = tl.load(e_ptr + rows, mask=rows < R, other=E)
        rm = (rows < R) & (ee < E)
        slot = tl.load(slot_ptr + rows, mask=rm, other=0)
        cw = tl.load(cw_ptr + slot, mask=rm, other=0.0).to(tl.float32)
        rows64 = rows.to(tl.int64)
        dot = tl.zeros((BR,), dtype=tl.float32)
        for h0 in range(0, H, BH):
            cols = h0 + tl.arange(0, BH)
            cm = (cols < H)[None, :]
            m = rm[:, None] & cm
            g = tl.load(dA_ptr + rows64[:, None] * stride_dA + cols[None, :], mask=m, other=0.0).to(tl.float32)
            a = tl.load(act_ptr + rows64[:, None] * stride_act + cols[None, :], mask=m, other=0.0).to(tl.float32)
            dot += tl.sum(g * a, axis=1)
            g = g * cw[:, None]
            hp = hpre_ptr + rows64[:, None] * stride_h + cols[None, :]
            hg = tl.load(hp, mask=m, other=0.0).to(tl.float32)
            dp = dh_ptr + rows64[:, None] * stride_dh + cols[None, :]
            sm = (rows < R)[:, None] & cm
            if SWIGLU:
                hu = tl.load(hp + H, mask=m, other=0.0).to(tl.float32)
                sg = tl.sigmoid(hg)
                tl.store(dp, (g * hu * sg * (1.0 + hg * (1.0 - sg))).to(dh_ptr.dtype.element_ty), mask=sm)
                tl.store(dp + H, (g * hg * sg).to(dh_ptr.dtype.element_ty), mask=sm)
            else:
                tl.store(dp, (g * _gelu_tanh_grad(hg)).to(dh_ptr.dtype.element_ty), mask=sm)
        if HAS_B2:
            e64 = ee.to(tl.int64)
            for d0 in range(0, D, BH):
                cols = d0 + tl.arange(0, BH)
                m = rm[:, None] & (cols < D)[None, :]
                u = tl.load(du_ptr + rows64[:, None] * stride_du + cols[None, :], mask=m, other=0.0).to(tl.float32)
                bb = tl.load(b2_ptr + e64[:, None] * stride_be + cols[None, :], mask=m, other=0.0).to(tl.float32)
                dot += tl.sum(u * bb, axis=1)
        tl.store(dcw_ptr + slot, dot, mask=rm)

    @triton.jit
    def _segsum_kernel(src_ptr, counts_ptr, starts_ptr, out_ptr, N, SPLIT, stride_sr, stride_op,
                       BR: tl.constexpr, BN: tl.constexpr):
        """out[e, s] = sum of the s-th of SPLIT equal chunks of src rows [start_e, start_e + count_e), in a fixed
        order, fp32 (the caller sums the SPLIT partials: enough programs to fill the GPU, still deterministic)."""
        e = tl.program_id(0)
        sp = tl.program_id(1)
        cols = tl.program_id(2) * BN + tl.arange(0, BN)
        cm = cols < N
        cnt = tl.load(counts_ptr + e)
        start = tl.load(starts_ptr + e)
        chunk = (cnt + SPLIT - 1) // SPLIT
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, cnt)
        acc = tl.zeros((BN,), dtype=tl.float32)
        for r0 in range(lo, hi, BR):
            rr = r0 + tl.arange(0, BR)
            rows = (start + rr).to(tl.int64)
            v = tl.load(src_ptr + rows[:, None] * stride_sr + cols[None, :],
                        mask=(rr < hi)[:, None] & cm[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(v, axis=0)
        tl.store(out_ptr + (e * SPLIT + sp).to(tl.int64) * stride_op + cols, acc, mask=cm)

    @triton.jit
    def _zero_empty_experts_kernel(w_ptr, counts_ptr, per_expert, BLOCK: tl.constexpr):
        """w[e] = 0 (in place, w contiguous [E, ...]) for the experts with no rows; the programs of every other
        expert return at once, so this costs nothing like a pass over w."""
        e = tl.program_id(0)
        if tl.load(counts_ptr + e) == 0:
            base = w_ptr + e.to(tl.int64) * per_expert
            step = tl.num_programs(1) * BLOCK
            for i0 in range(tl.program_id(1) * BLOCK, per_expert, step):
                offs = i0 + tl.arange(0, BLOCK)
                tl.store(base + offs, tl.zeros((BLOCK,), dtype=w_ptr.dtype.element_ty), mask=offs < per_expert)


# ----------------------------------------------------------------------------------------------
# Tile configurations (fixed by shape, never timed at run time: keeps results bitwise stable)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmConfig:
    BM: int
    BN: int
    BK: int
    num_warps: int = 4
    num_stages: int = 3
    GROUP_M: int = 8


# Set entries here (e.g. from a benchmark sweep) to override the heuristics: key = kernel name
# ("gemm1", "gemm2", "bwd_act", "dx", "dw1", "dw2"), value = GemmConfig.
CONFIG_OVERRIDE: Dict[str, GemmConfig] = {}
# Forward GEMMs with at most this many slot rows per expert (T*K/E) take the decode tiles of _pick_config.
DECODE_ROWS_PER_EXPERT = 16


def _pick_config(kind: str, rows_per_expert: float, n: int, k: int, dtype: torch.dtype, swiglu: bool) -> GemmConfig:
    """Fixed tile configuration per kernel and shape class (from the H100 sweep of
    benchmarks/fused_moe_sweep.py; results in benchmarks/results/fused_moe_sweep.md)."""
    if kind in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE[kind]
    if _interpret():
        return GemmConfig(32, 32, 32, 4, 1, 4)
    if dtype == torch.float32:  # tf32: half the K tile to fit shared memory
        if kind in ("dw1", "dw2"):
            return GemmConfig(64, 128, 32, 4, 3, 8)
        bm = 64 if rows_per_expert < 96 else 128
        return GemmConfig(bm, 64 if swiglu and kind == "gemm1" else 128, 32, 4, 3, 8)
    if kind in ("dw1", "dw2"):  # M, N = feature dims, K = the expert's rows
        return GemmConfig(128, 128, 64, 8 if swiglu else 4, 3, 8)
    if kind in ("gemm1", "gemm2") and rows_per_expert <= DECODE_ROWS_PER_EXPERT:
        # Decode (a few tokens per expert): the step only streams the chosen experts' weights, so the tiles are
        # short (16 rows, the least tl.dot takes) and narrow (more programs than SMs even when only 2 experts are
        # used, which 128-wide tiles over D = 2560 are not: 40 programs on 132 SMs) with long K steps in flight.
        # GEMM2 keeps 64 columns (128-byte rows of w2) and gets its programs from splitting K (decode_split_k).
        bn = 64 if kind == "gemm2" or n > 4096 else 32
        return GemmConfig(16, bn, 128, 4, 3 if swiglu else 4, 8)
    bm = 64 if rows_per_expert < 96 else 128
    if kind == "gemm1":
        if swiglu:  # two accumulators (gate, up)
            return GemmConfig(bm, 128, 64, 8, 3, 8)
        return GemmConfig(bm, 256, 64, 8, 3, 8) if n >= 256 and bm == 128 else GemmConfig(bm, 128, 64, 4, 3, 8)
    if kind == "bwd_act":  # heavy epilogue: 128x256 tiles spill
        return GemmConfig(bm, 128, 64, 8 if swiglu else 4, 3, 8)
    # gemm2, dx
    return GemmConfig(bm, 256, 64, 8, 3, 8) if n >= 256 and bm == 128 else GemmConfig(bm, 128, 64, 4, 3, 8)


# ----------------------------------------------------------------------------------------------
# Host-side wrappers (no host synchronisation)
# ----------------------------------------------------------------------------------------------
@dataclass
class RouteMeta:
    sorted_slot: Tensor  # int32 [TK]: slot ids, kept slots grouped by expert (stable), dropped last
    counts: Tensor  # int32 [E]
    starts: Tensor  # int32 [E]
    e_row: Tensor  # int32 [TK]: expert of each sorted row; E for the rows past the kept ones
    slot_row: Tensor  # int32 [TK]: sorted row of each slot (the inverse permutation of sorted_slot)
    valid: Tensor  # uint8 [TK]: the slot is kept and its expert index is in [0, E)
    E: int
    E_PAD: int
    buf: Tensor  # the one int32 allocation the index arrays above are views of


def _route_layout(TK: int, E: int) -> tuple[int, int, int, int, int, int]:
    """Launch geometry and buffer layout of :func:`route` for T*K = ``TK`` slots and E experts (also what the
    fake implementation of the custom op allocates): (E_PAD, SB, NSUB, nb, TKA, buffer length)."""
    E_PAD = _next_pow2(E + 1)
    # Slots per sub-block: the [SB, E_PAD] one-hot fits in registers, and no wider than the slots there are (a decode
    # step has a few: Mixtral's batch-1 scatter over a 1024-wide block took 8.9 us of a 1.16 ms step on the H200).
    # Past the cap (a power of two) no power of two of TK is taken: traced with a symbolic TK (the fake
    # implementation under dynamic shapes), the layout is then a formula in TK valid for every TK >= cap, not a
    # specialisation that recompiles each sequence length.
    cap = min(1024, 16384 // E_PAD)
    SB = max(16, cap if TK >= cap else _next_pow2(TK))
    NSUB = max(1, min(1024 // SB, -(-TK // SB)))
    if _interpret():
        SB, NSUB = max(16, min(SB, 64)), 2  # two sub-blocks: the loop is tested on CPU too
    nb = max(1, -(-TK // (SB * NSUB)))
    TKA = -(-TK // 4) * 4  # each part 16-byte aligned (Triton specialises kernels on pointer alignment)
    # One int32 allocation (host time per call counts here): sorted_slot, e_row, slot_row [TKA each], then the
    # per-program histograms [nb, E_PAD] and the counts and starts [E_PAD each].
    return E_PAD, SB, NSUB, nb, TKA, 3 * TKA + nb * E_PAD + 2 * E_PAD


def _route_views(buf: Tensor, valid: Tensor, TK: int, E: int) -> RouteMeta:
    """The :class:`RouteMeta` views of :func:`route`'s one int32 buffer ``buf`` and its valid flags."""
    E_PAD, _, _, nb, TKA, _ = _route_layout(TK, E)
    cs = buf[3 * TKA + nb * E_PAD:]
    return RouteMeta(buf[:TK], cs[:E], cs[E_PAD:E_PAD + E], buf[TKA:TKA + TK], buf[2 * TKA:2 * TKA + TK], valid, E,
                     _next_pow2(E), buf)


def route(expert_index: Tensor, keep: Tensor, E: int) -> RouteMeta:
    """Stable counting sort of the T*K slots by expert, on device: three Triton kernels, no host sync.
    ``keep`` [T, K] (bool or numbers, nonzero = kept); slots with an expert index outside [0, E) are dropped."""
    TK = expert_index.numel()
    dev = expert_index.device
    e_flat = expert_index.reshape(-1)
    k_flat = keep.reshape(-1)
    if k_flat.dtype == torch.bool:
        k_flat = k_flat.view(torch.uint8)
    E_PAD, SB, NSUB, nb, TKA, n = _route_layout(TK, E)
    buf = torch.empty(n, dtype=torch.int32, device=dev)
    valid = torch.empty(TK, dtype=torch.uint8, device=dev)
    meta = _route_views(buf, valid, TK, E)
    hist = buf[3 * TKA:]
    cs = hist[nb * E_PAD:]
    _route_hist_kernel[(nb,)](e_flat, k_flat, valid, hist, TK, E, E_PAD=E_PAD, SB=SB, NSUB=NSUB)
    _route_scan_kernel[(1,)](hist, cs, nb, E_PAD=E_PAD, RB=max(1, min(256, 4096 // E_PAD)))
    _route_scatter_kernel[(nb,)](e_flat, valid, hist, cs, meta.sorted_slot, meta.e_row, meta.slot_row, TK, E,
                                 E_PAD=E_PAD, SB=SB, NSUB=NSUB)
    return meta


def _num_m_tiles(TK: int, E: int, BM: int) -> int:
    # sum_e ceil(c_e / BM) <= floor(TK / BM) + E  (static bound, no sync)
    return TK // BM + E


def _launch_gemm1(x, w1, b1, meta: RouteMeta, K: int, H: int, swiglu: bool, store_hpre: bool):
    TK = meta.sorted_slot.numel()
    D = x.shape[1]
    H2 = w1.shape[2]
    cfg = _pick_config("gemm1", TK / meta.E, H2, D, x.dtype, swiglu)
    act = torch.empty(TK, H, dtype=x.dtype, device=x.device)
    hpre = torch.empty(TK, H2, dtype=x.dtype, device=x.device) if store_hpre else act
    num_m = _num_m_tiles(TK, meta.E, cfg.BM)
    grid = (num_m * triton.cdiv(H, cfg.BN),)
    _gemm1_kernel[grid](
        x, w1, b1 if b1 is not None else x, hpre, act, meta.sorted_slot, meta.counts, meta.starts,
        D, H, K, meta.E, num_m,
        x.stride(0), w1.stride(0), w1.stride(1), w1.stride(2), b1.stride(0) if b1 is not None else 0,
        hpre.stride(0), act.stride(0),
        SWIGLU=swiglu, HAS_BIAS=b1 is not None, STORE_HPRE=store_hpre,
        UPCAST=_interpret() and x.dtype != torch.float32, TF32=x.dtype == torch.float32,
        EVEN_K=D % cfg.BK == 0, E_PAD=meta.E_PAD, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (hpre if store_hpre else None), act


def decode_split_k(TK: int, E: int, n: int, kd: int, cfg: GemmConfig) -> int:
    """K chunks of the forward GEMM2 at decode (at most ``DECODE_ROWS_PER_EXPERT`` slot rows per expert), else 1.

    A decode step's GEMM2 streams the chosen experts' [H, D] weights into few output tiles: without splitting H,
    Phi-2x4's GEMM2 had 40-160 programs and read at half the copy bandwidth (2.2 TB/s on the H200,
    ``benchmarks/results/generate_session14.md``) where GEMM1, with 4x more output columns, read at full speed.
    Chunks of H give ~512 programs in flight; the caller adds the partials in a fixed order (deterministic). A pure
    function of the shape."""
    if TK / E > DECODE_ROWS_PER_EXPERT:
        return 1
    busy = triton.cdiv(n, cfg.BN) * min(E, TK)  # output tiles with rows: one M tile per expert used
    wanted = max(1, min(8, 512 // busy, kd // cfg.BK))
    # Chunks are whole K tiles, so fewer may cover K than were asked for (H = 1408, 8 asked: 6 of 256 rows). Return
    # the count that covers it: every partial the caller allocates and adds up is then written.
    return triton.cdiv(kd, _k_chunk(kd, wanted, cfg.BK))


def _k_chunk(kd: int, split: int, bk: int) -> int:
    """Rows of K per split-K chunk: ``kd / split`` rounded up to whole ``bk`` tiles (EVEN_K holds in every chunk)."""
    return triton.cdiv(triton.cdiv(kd, split), bk) * bk


def _launch_gemm_scatter(kind, a, w, bias, cw, meta: RouteMeta, n: int, kd: int, stride_wk: int, stride_wn: int,
                         out: Tensor, split: int = 1, cfg: Optional[GemmConfig] = None):
    """``out`` [TK, n], or [split, TK, n] fp32 partial sums over ``split`` chunks of K (:func:`decode_split_k`).
    ``cfg``: the tiles, when the caller already picked them."""
    TK = meta.sorted_slot.numel()
    cfg = cfg or _pick_config(kind, TK / meta.E, n, kd, a.dtype, False)
    num_m = _num_m_tiles(TK, meta.E, cfg.BM)
    k_chunk = _k_chunk(kd, split, cfg.BK)
    grid = (num_m * triton.cdiv(n, cfg.BN), triton.cdiv(kd, k_chunk))
    if grid[1] != split:
        raise ValueError(f"split={split} chunks of K={kd} in whole tiles of {cfg.BK} are {grid[1]}: take the split "
                         "from decode_split_k (a partial left unwritten would be added as garbage)")
    _gemm_scatter_kernel[grid](
        a, w, bias if bias is not None else a, cw if cw is not None else a, out, meta.sorted_slot,
        meta.counts, meta.starts, kd, n, meta.E, num_m, k_chunk,
        a.stride(0), w.stride(0), stride_wk, stride_wn, bias.stride(0) if bias is not None else 0,
        out.stride(-2), out.stride(0) if out.dim() == 3 else 0,
        HAS_BIAS=bias is not None, HAS_CW=cw is not None,
        UPCAST=_interpret() and a.dtype != torch.float32, TF32=a.dtype == torch.float32,
        EVEN_K=kd % cfg.BK == 0, E_PAD=meta.E_PAD, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
        SPLIT_K=grid[1] > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _combine(src: Tensor, valid: Tensor, T: int, K: int, out_dtype: torch.dtype, idx: Optional[Tensor] = None,
             w: Optional[Tensor] = None, e: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """``src`` [rows, D], or [split, rows, D] split-K partials (added here, in order, before the slots)."""
    split = src.shape[0] if src.dim() == 3 else 1
    D = src.shape[-1]
    out = torch.empty(T, D, dtype=out_dtype, device=src.device)
    BD = min(256, _next_pow2(D))
    BT = 4 if _interpret() else max(1, min(16, 2048 // BD))
    grid = (triton.cdiv(T, BT), triton.cdiv(D, BD))
    _combine_kernel[grid](
        src, idx if idx is not None else valid, valid, w if w is not None else src, e if e is not None else valid,
        bias if bias is not None else src, out,
        T, D, src.stride(-2), bias.stride(0) if bias is not None else 0, out.stride(0),
        src.stride(0) if split > 1 else 0,
        K_TOP=K, HAS_IDX=idx is not None, HAS_W=w is not None, HAS_BIAS=bias is not None, BT=BT, BD=BD, SPLIT=split,
    )
    return out


def _launch_wgrad(kind, a, b, cw, meta: RouteMeta, K: int, M: int, N: int, out: Tensor, db: Optional[Tensor],
                  gather_a: bool, gather_b: bool, scale_b: bool):
    E = meta.E
    cfg = _pick_config(kind, meta.sorted_slot.numel() / E, N, M, a.dtype, False)
    grid = (E * triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN),)
    _wgrad_kernel[grid](
        a, b, cw if cw is not None else a, out, db if db is not None else out, meta.sorted_slot,
        meta.counts, meta.starts, M, N, K, E,
        a.stride(0), b.stride(0), out.stride(0), out.stride(1), out.stride(2), db.stride(0) if db is not None else 0,
        GATHER_A=gather_a, GATHER_B=gather_b, SCALE_B=scale_b, HAS_DB=db is not None,
        UPCAST=_interpret() and a.dtype != torch.float32, TF32=a.dtype == torch.float32,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


# ---------------------------------- shared helpers ----------------------------------
def _rows_grid(R, N):
    BR, BH = (8, 32) if _interpret() else (16, 128)
    return (triton.cdiv(R, BR), triton.cdiv(N, BH)), BR, BH


def _gather_rows(src: Tensor, meta: RouteMeta, e_row: Tensor, K: int, cw: Optional[Tensor] = None,
                 unscaled: bool = True, scaled: bool = False):
    """Rows of src [T, D] in sorted-slot order (and/or scaled by the combine weight); zero tail rows."""
    R = meta.sorted_slot.numel()
    D = src.shape[1]
    out_u = torch.empty(R, D, dtype=src.dtype, device=src.device) if unscaled else None
    out_s = torch.empty(R, D, dtype=src.dtype, device=src.device) if scaled else None
    grid, BR, BD = _rows_grid(R, D)
    _gather_rows_kernel[grid](src, meta.sorted_slot, cw if cw is not None else src, e_row,
                              out_u if unscaled else src, out_s if scaled else src, R, D, K, meta.E,
                              src.stride(0), out_u.stride(0) if unscaled else 0, out_s.stride(0) if scaled else 0,
                              WRITE_U=unscaled, WRITE_S=scaled, BR=BR, BD=BD)
    return out_u, out_s


def _segsum(src: Tensor, meta: RouteMeta, dtype) -> Tensor:
    """Per-expert sums of the rows of ``src`` [R, N] in sorted order -> [E, N]; deterministic."""
    N = src.shape[1]
    BR, BN = (16, 32) if _interpret() else (32, 128)
    n_col = triton.cdiv(N, BN)
    split = 2 if _interpret() else max(1, min(64, -(-1024 // (meta.E * n_col))))  # fixed by shape: ~1K programs
    part = torch.empty(meta.E, split, N, dtype=torch.float32, device=src.device)
    _segsum_kernel[(meta.E, split, n_col)](src, meta.counts, meta.starts, part, N, split, src.stride(0),
                                          part.stride(1), BR=BR, BN=BN)
    return part.sum(1).to(dtype)


def _zero_empty_groups(w: Tensor, counts: Tensor) -> Tensor:
    """Zero, in place, the weight gradient of every expert with no rows: a K-grouped GEMM need not write an empty
    group. Only those experts' blocks are written (a torch.where over the whole gradient cost Mixtral 4 ms)."""
    w = w.contiguous()
    per_expert = w[0].numel() if w.shape[0] else 0
    BLOCK = 1024
    n_prog = max(1, min(256, triton.cdiv(per_expert, BLOCK * 8)))
    _zero_empty_experts_kernel[(w.shape[0], n_prog)](w, counts, per_expert, BLOCK=BLOCK)
    return w


# ---------------------------------- Triton expert GEMMs ----------------------------------
def _triton_forward(x, cw, w1, b1, w2, b2, meta, K, swiglu, need_grad):
    T, D = x.shape
    H = w2.shape[1]
    TK = T * K
    hpre, act = _launch_gemm1(x, w1, b1, meta, K, H, swiglu, store_hpre=need_grad)
    cfg = _pick_config("gemm2", TK / meta.E, D, H, x.dtype, False)
    split = decode_split_k(TK, meta.E, D, H, cfg)
    # split > 1: fp32 partials over chunks of H, added in a fixed order by the combine (no kernel of their own)
    yslot = (torch.empty(split, TK, D, dtype=torch.float32, device=x.device) if split > 1
             else torch.empty(TK, D, dtype=x.dtype, device=x.device))
    _launch_gemm_scatter("gemm2", act, w2, b2, cw, meta, D, H, w2.stride(1), w2.stride(2), yslot, split, cfg)
    y = _combine(yslot, meta.valid, T, K, x.dtype)
    return y, hpre, act


def _launch_bwd_act(dy, w2, b2, act, hpre, cw, meta: RouteMeta, K: int, swiglu: bool, dh: Tensor):
    """dh = act'(h) * cw * (dy[tok] @ w2[e]^T); returns the d(combine_weight) partials [num_n, TK]."""
    TK = meta.sorted_slot.numel()
    D = dy.shape[1]
    H = w2.shape[1]
    E = meta.E
    cfg = _pick_config("bwd_act", TK / E, H, D, dy.dtype, swiglu)
    num_m = _num_m_tiles(TK, E, cfg.BM)
    num_n = triton.cdiv(H, cfg.BN)
    # Rows of dropped slots are never written: the caller masks them (torch.where on the valid flags).
    dcw_part = torch.empty(num_n, TK, dtype=torch.float32, device=dy.device)
    _bwd_act_kernel[(num_m * num_n,)](
        dy, w2, b2 if b2 is not None else dy, act, hpre, cw, dh, dcw_part, meta.sorted_slot, meta.counts,
        meta.starts, D, H, K, E, num_m, TK,
        dy.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), b2.stride(0) if b2 is not None else 0,
        act.stride(0), hpre.stride(0), dh.stride(0),
        SWIGLU=swiglu, HAS_B2=b2 is not None,
        UPCAST=_interpret() and dy.dtype != torch.float32, TF32=dy.dtype == torch.float32,
        EVEN_K=D % cfg.BK == 0, E_PAD=meta.E_PAD, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dcw_part


# Weight-gradient operands: gathered/scaled inside the kernel (False) or first copied in sorted order by a
# small gather kernel (True).  Fixed defaults, chosen from GPU sweeps; the sweep script flips them.
WGRAD_PREGATHER = {"dw1": False, "dw2": True}


def _triton_backward(dy, x, cw, w1, b1, w2, b2, meta, e_flat, K, swiglu, hpre, act, needs):
    T, D = x.shape
    H = w2.shape[1]
    H2 = w1.shape[2]
    TK = T * K
    dh = torch.empty(TK, H2, dtype=x.dtype, device=x.device)
    dcw_part = _launch_bwd_act(dy, w2, b2, act, hpre, cw, meta, K, swiglu, dh)
    dcw = dcw_part.sum(0) if dcw_part.shape[0] > 1 else dcw_part[0]
    dx = dw1 = db1 = dw2 = db2 = None
    if needs["x"]:
        dxslot = torch.empty(TK, D, dtype=x.dtype, device=x.device)
        _launch_gemm_scatter("dx", dh, w1, None, None, meta, D, H2, w1.stride(2), w1.stride(1), dxslot)
        dx = _combine(dxslot, meta.valid, T, K, x.dtype)
    e_row = meta.e_row
    if needs["w1"] or needs["b1"]:
        dw1 = torch.empty_like(w1)
        db1 = torch.empty_like(b1) if b1 is not None else None
        if WGRAD_PREGATHER["dw1"]:
            xs, _ = _gather_rows(x, meta, e_row, K)
            _launch_wgrad("dw1", xs, dh, None, meta, K, D, H2, dw1, db1, gather_a=False, gather_b=False, scale_b=False)
        else:
            _launch_wgrad("dw1", x, dh, None, meta, K, D, H2, dw1, db1, gather_a=True, gather_b=False, scale_b=False)
    if needs["w2"] or needs["b2"]:
        dw2 = torch.empty_like(w2)
        db2 = torch.empty_like(b2) if b2 is not None else None
        if WGRAD_PREGATHER["dw2"]:
            _, d_o = _gather_rows(dy, meta, e_row, K, cw, unscaled=False, scaled=True)
            _launch_wgrad("dw2", act, d_o, None, meta, K, H, D, dw2, db2, gather_a=False, gather_b=False, scale_b=False)
        else:
            _launch_wgrad("dw2", act, dy, cw, meta, K, H, D, dw2, db2, gather_a=False, gather_b=True, scale_b=True)
    return dx, dcw, dw1, db1, dw2, db2


# ---------------------------------- torch._grouped_mm expert GEMMs ----------------------------------
def _gmm_forward(x, cw, w1, b1, w2, b2, meta, e_flat, K, swiglu):
    T, D = x.shape
    H = w2.shape[1]
    e_row = meta.e_row
    offs = torch.cumsum(meta.counts, 0, dtype=torch.int32)
    xs, _ = _gather_rows(x, meta, e_row, K)
    h = torch._grouped_mm(xs, w1, offs=offs)  # rows past the kept ones: unspecified, never used
    R = h.shape[0]
    act = torch.empty(R, H, dtype=x.dtype, device=x.device)
    grid, BR, BH = _rows_grid(R, H)
    _bias_act_kernel[grid](h, e_row, b1 if b1 is not None else h, act, R, H, h.stride(0),
                           b1.stride(0) if b1 is not None else 0, act.stride(0),
                           SWIGLU=swiglu, HAS_BIAS=b1 is not None, E=meta.E, BR=BR, BH=BH)
    o = torch._grouped_mm(act, w2, offs=offs)
    y = _combine(o, meta.valid, T, K, x.dtype, idx=meta.slot_row, w=cw,
                 e=e_flat.reshape(-1) if b2 is not None else None, bias=b2)
    return y, h, act


def _gmm_backward(dy, x, cw, w1, b1, w2, b2, meta, e_flat, K, swiglu, hpre, act, needs):
    T, D = x.shape
    H = w2.shape[1]
    H2 = w1.shape[2]
    E = meta.E
    R = meta.sorted_slot.numel()
    e_row = meta.e_row
    offs = torch.cumsum(meta.counts, 0, dtype=torch.int32)
    need_w2 = needs["w2"] or needs["b2"]
    d_u, d_o = _gather_rows(dy, meta, e_row, K, cw, unscaled=True, scaled=need_w2)
    dA = torch._grouped_mm(d_u, w2.transpose(-2, -1), offs=offs)  # unweighted dy[tok] @ w2[e]^T
    dh = torch.empty(R, H2, dtype=x.dtype, device=x.device)
    dcw = torch.empty(R, dtype=torch.float32, device=x.device)  # dropped slots: never written, masked by the caller
    BR, BH = (8, 32) if _interpret() else (8, 256)
    _dact_rows_kernel[(triton.cdiv(R, BR),)](
        dA, act, hpre, d_u, b2 if b2 is not None else d_u, cw, meta.sorted_slot, e_row, dh, dcw,
        R, H, D, E, dA.stride(0), act.stride(0), hpre.stride(0), d_u.stride(0),
        b2.stride(0) if b2 is not None else 0, dh.stride(0),
        SWIGLU=swiglu, HAS_B2=b2 is not None, BR=BR, BH=BH)
    dx = dw1 = db1 = dw2 = db2 = None
    if needs["x"]:
        dxs = torch._grouped_mm(dh, w1.transpose(-2, -1), offs=offs)
        dx = _combine(dxs, meta.valid, T, K, x.dtype, idx=meta.slot_row)
    if needs["w1"] or needs["b1"]:
        xs, _ = _gather_rows(x, meta, e_row, K)
        dw1 = _zero_empty_groups(torch._grouped_mm(xs.t(), dh, offs=offs), meta.counts)
        if b1 is not None:
            db1 = _segsum(dh, meta, b1.dtype)
    if need_w2:
        dw2 = _zero_empty_groups(torch._grouped_mm(act.t(), d_o, offs=offs), meta.counts)
        if b2 is not None:
            db2 = _segsum(d_o, meta, b2.dtype)
    return dx, dcw, dw1, db1, dw2, db2


# ---------------------------------- the op and its gradient ----------------------------------
# One forward and one backward implementation, called two ways:
# * under torch.compile, as PyTorch custom ops (``torch.ops.zoo.fused_moe_forward`` / ``..._backward``) with fake
#   implementations that give their output shapes: the compiler then takes a whole MoE layer (routing, losses,
#   these kernels) as ONE graph instead of breaking it here, and that graph can be replayed as a CUDA graph, which
#   removes the per-launch host cost that makes small MoE layers launch-bound (``MoEConfig.cuda_graphs``);
# * eagerly, through a plain autograd.Function: the custom-op dispatch costs 0.5-0.8 ms more host time per forward +
#   backward at V-MoE sizes (``benchmarks/results/host_overhead.md``), a third of what the launches it wraps cost.
def _forward_impl(x: Tensor, cw: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                  expert_index: Tensor, keep: Tensor, swiglu: bool, backend: str,
                  need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``backend``: a key of :data:`BACKENDS` (its forward half runs here, its backward half in the backward op).
    Returns y [T, D] and what the backward needs: the routing buffer and valid flags (:func:`route`), the pre-activation
    ``hpre`` (empty [0] when ``need_grad`` is False) and the activation ``act`` [T*K, H]."""
    K = expert_index.shape[1]
    meta = route(expert_index, keep, w1.shape[0])
    cw_flat = cw.reshape(-1).contiguous()  # the kernels read it in its own dtype and compute in fp32
    if BACKENDS[backend][0] == "grouped_mm":
        y, hpre, act = _gmm_forward(x, cw_flat, w1, b1, w2, b2, meta, expert_index, K, swiglu)
    else:
        y, hpre, act = _triton_forward(x, cw_flat, w1, b1, w2, b2, meta, K, swiglu, need_grad)
    if not need_grad:
        hpre = x.new_empty(0)
    return y, meta.buf, meta.valid, hpre, act


def _backward_impl(dy: Tensor, x: Tensor, cw: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                   b2: Optional[Tensor], expert_index: Tensor, valid: Tensor, buf: Tensor, hpre: Tensor, act: Tensor,
                   swiglu: bool, backend: str, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d combine_weight, dw1, db1, dw2, db2); ``needs`` says which of them are wanted (the others are empty)."""
    K = expert_index.shape[1]
    E = w1.shape[0]
    meta = _route_views(buf, valid, expert_index.numel(), E)
    dy = dy.to(x.dtype).contiguous()
    wanted = dict(zip(("x", "cw", "w1", "b1", "w2", "b2"), needs))
    backward = _gmm_backward if BACKENDS[backend][1] == "grouped_mm" else _triton_backward
    grads = list(backward(dy, x, cw.reshape(-1), w1, b1, w2, b2, meta, expert_index, K, swiglu, hpre, act, wanted))
    grads[1] = torch.where(valid.view(torch.bool), grads[1], 0.0).reshape(cw.shape).to(cw.dtype)  # the flags are
    # a bool mask's bytes; dropped slots' partials were never written
    return tuple(g if (want and g is not None) else x.new_empty(0) for g, want in zip(grads, needs))


def _forward_fake(x, cw, w1, b1, w2, b2, expert_index, keep, swiglu, backend, need_grad):
    T, K = expert_index.shape
    H, H2 = w2.shape[1], w1.shape[2]
    buf_len = _route_layout(T * K, w1.shape[0])[-1]
    return (x.new_empty(T, x.shape[1]), x.new_empty(buf_len, dtype=torch.int32),
            x.new_empty(T * K, dtype=torch.uint8), x.new_empty((T * K, H2) if need_grad else (0,)),
            x.new_empty(T * K, H))


def _backward_fake(dy, x, cw, w1, b1, w2, b2, expert_index, valid, buf, hpre, act, swiglu, backend, needs):
    like = (x, cw, w1, b1, w2, b2)
    return tuple(t.new_empty(t.shape) if (want and t is not None) else x.new_empty(0) for t, want in zip(like, needs))


def _setup_context(ctx, inputs, output):
    x, cw, w1, b1, w2, b2, expert_index, keep, swiglu, backend, need_grad = inputs
    _, buf, valid, hpre, act = output
    ctx.mark_non_differentiable(buf, valid, hpre, act)
    if need_grad:
        ctx.save_for_backward(x, cw, w1, b1, w2, b2, expert_index, valid, buf, hpre, act)
    ctx.settings = (swiglu, backend)


def _input_grads(ctx, dy: Tensor, backward: Callable, n_settings: int) -> tuple:
    """The gradients autograd wants from either path: ``backward`` (the op or its implementation) for the six
    differentiable inputs, None for the rest (``n_settings`` non-tensor arguments)."""
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    grads = backward(dy, *ctx.saved_tensors, *ctx.settings, needs)
    return (*(g if n else None for g, n in zip(grads, needs)), None, None, *(None,) * n_settings)


def _backward(ctx, dy, *_):
    return _input_grads(ctx, dy, fused_moe_backward, 3)  # swiglu, backend, need_grad


fused_moe_forward = torch.library.custom_op("zoo::fused_moe_forward", _forward_impl, mutates_args=())
fused_moe_forward.register_fake(_forward_fake)
fused_moe_backward = torch.library.custom_op("zoo::fused_moe_backward", _backward_impl, mutates_args=())
fused_moe_backward.register_fake(_backward_fake)
fused_moe_forward.register_autograd(_backward, setup_context=_setup_context)


class _FusedMoEFunction(torch.autograd.Function):
    """The eager path: the same implementations without the custom-op dispatch."""

    @staticmethod
    def forward(ctx, x, cw, w1, b1, w2, b2, expert_index, keep, swiglu, backend):
        need_grad = any(ctx.needs_input_grad[:6])
        y, buf, valid, hpre, act = _forward_impl(x, cw, w1, b1, w2, b2, expert_index, keep, swiglu, backend, need_grad)
        if need_grad:
            ctx.save_for_backward(x, cw, w1, b1, w2, b2, expert_index, valid, buf, hpre, act)
            ctx.settings = (swiglu, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _input_grads(ctx, dy, _backward_impl, 2)  # swiglu, backend


BACKENDS = {"triton": ("triton", "triton"), "grouped_mm": ("grouped_mm", "grouped_mm"),
            "hybrid": ("triton", "grouped_mm")}


def auto_backend(T: int, K: int, E: int, D: int, H: int, activation: str, grouped_mm_ok: bool) -> str:
    """The rule behind ``backend="auto"`` (pure function of the shape).

    From H100 timings of fused_moe forward+backward replayed as CUDA graphs, which is how the MoE layer runs it in
    training (``benchmarks/results/fused_moe_backends.md``): the weight and input gradients are fastest on
    torch._grouped_mm's CUTLASS GEMMs at every benchmarked shape, so the backward is grouped_mm wherever it runs
    (sm90+, bf16). The forward stays on the gather-fused Triton kernels ("hybrid": also what inference runs, and
    Triton's fewer launches cost less host time when nothing is captured) except for large SwiGLU experts (OLMoE,
    Mixtral), whose grouped_mm forward is faster.
    """
    if not grouped_mm_ok:
        return "triton"
    work = (T * K / max(E, 1)) * D * H
    if activation == "swiglu" and work >= 1e9:
        return "grouped_mm"
    return "hybrid"


def choose_backend(x: Tensor, T: int, K: int, E: int, D: int, H: int, activation: str) -> str:
    """Expert-GEMM backend for ``backend="auto"``, fixed by shape (never timed at run time, so results
    stay bitwise reproducible from run to run); see :func:`auto_backend`."""
    return auto_backend(T, K, E, D, H, activation, grouped_mm_available(x))


def fused_moe(
    x: Tensor,
    expert_index: Tensor,
    combine_weight: Tensor,
    keep: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    activation: str = "gelu_tanh",
    backend: str = "auto",
) -> Tensor:
    """Fused MoE expert path; see the module docstring for the contract.

    ``backend``: "triton" (fused gather/epilogue Triton kernels, forward and backward), "grouped_mm"
    (torch._grouped_mm expert GEMMs + small Triton gather/epilogue kernels, bf16 only), "hybrid" (Triton
    forward, grouped_mm backward) or "auto" (per-shape choice by :func:`choose_backend`).
    Slots whose expert index is outside [0, E) are treated as dropped.
    """
    if not _HAS_TRITON:
        raise RuntimeError("fused_moe needs triton")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"fused_moe supports {_SUPPORTED_DTYPES}, got {x.dtype}")
    T, D = x.shape
    if expert_index.dim() != 2 or expert_index.shape[0] != T:
        raise ValueError(f"expert_index must be [T, K] with T={T}, got {tuple(expert_index.shape)}")
    K = expert_index.shape[1]
    if combine_weight.shape != expert_index.shape or keep.shape != expert_index.shape:
        raise ValueError("combine_weight and keep must have the shape of expert_index")
    if w1.dim() != 3 or w2.dim() != 3:
        raise ValueError("w1 must be [E, D, H|2H] and w2 [E, H, D]")
    E, Dw, H2 = w1.shape
    H = w2.shape[1]
    swiglu = activation == "swiglu"
    if Dw != D or w2.shape[0] != E or w2.shape[2] != D or H2 != (2 * H if swiglu else H):
        raise ValueError(f"weight shapes w1 {tuple(w1.shape)} w2 {tuple(w2.shape)} do not match D={D}, "
                         f"activation={activation}")
    if b1 is not None and tuple(b1.shape) != (E, H2):
        raise ValueError(f"b1 must be [{E}, {H2}], got {tuple(b1.shape)}")
    if b2 is not None and tuple(b2.shape) != (E, D):
        raise ValueError(f"b2 must be [{E}, {D}], got {tuple(b2.shape)}")
    if not (x.is_cuda or _interpret()):
        raise RuntimeError("fused_moe runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
    if torch.is_autocast_enabled(x.device.type):
        # Autocast does not reach into custom kernels: cast as it would cast a matmul's inputs, so that
        # mixed-precision training (fp32 master weights, bf16 autocast) runs the expert GEMMs in bf16 too.
        with torch.autocast(x.device.type, enabled=False):
            amp = torch.get_autocast_dtype(x.device.type)
            return fused_moe(x.to(amp), expert_index, combine_weight.to(amp), keep, w1, b1, w2, b2, activation,
                             backend)
    if T == 0 or K == 0:
        return x.new_zeros(T, D) + 0.0 * (w1.sum() + w2.sum())
    if backend == "auto":
        backend = choose_backend(x, T, K, E, D, H, activation)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {tuple(BACKENDS)}")
    if "grouped_mm" in BACKENDS[backend] and not (hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16):
        raise RuntimeError(f"backend {backend!r} needs torch._grouped_mm and bf16 inputs")
    dt = x.dtype
    x = x.contiguous()
    w1c = w1.to(dt).contiguous()
    w2c = w2.to(dt).contiguous()
    b1c = b1.to(dt).contiguous() if b1 is not None else None
    b2c = b2.to(dt).contiguous() if b2 is not None else None
    ei = expert_index.contiguous()
    if ei.dtype not in (torch.int32, torch.int64):
        ei = ei.long()
    # Whether a slot counts (kept and its expert in [0, E)) is decided by the routing kernel, which reads keep as is.
    if torch.compiler.is_compiling():
        need_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, combine_weight, w1c, b1c, w2c, b2c))
        return fused_moe_forward(x, combine_weight, w1c, b1c, w2c, b2c, ei, keep, swiglu, backend, need_grad)[0]
    return _FusedMoEFunction.apply(x, combine_weight, w1c, b1c, w2c, b2c, ei, keep, swiglu, backend)
