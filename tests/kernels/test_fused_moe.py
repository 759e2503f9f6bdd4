"""Tests of the fused MoE expert path (zoo.kernels.fused_moe) against the per-expert reference.

On CUDA every case runs in this process, plus larger GPU-only cases.  Without CUDA the SMALL
cases run the very same Triton kernels on CPU under ``TRITON_INTERPRET=1``: Triton decides at
kernel-definition (import) time whether a kernel is interpreted, so those cases run in two worker
subprocesses started with that variable set (this file run as a script), which also check that the
kernels they launch are really Triton's interpreted functions.  Worker results come back as JSON.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zoo.kernels import fused_moe, fused_moe_available
from zoo.moe.dispatch import reference_moe

REPO = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()

# name -> case.  dims kept small: the CPU interpreter runs every program of every kernel in numpy.
CASES = {
    "gelu_f32": dict(T=37, D=48, H=40, E=4, K=2, act="gelu_tanh", dtype="float32"),
    "swiglu_f32": dict(T=37, D=48, H=40, E=4, K=2, act="swiglu", dtype="float32"),
    "swiglu_bf16_nobias": dict(T=45, D=64, H=32, E=4, K=2, act="swiglu", dtype="bfloat16", bias=False),
    "gelu_fp16_k1": dict(T=33, D=32, H=64, E=3, K=1, act="gelu_tanh", dtype="float16"),
    "one_expert": dict(T=19, D=32, H=32, E=1, K=1, act="gelu_tanh", dtype="float32"),
    "k_equals_e": dict(T=21, D=32, H=32, E=4, K=4, act="swiglu", dtype="float32"),
    "zero_token_experts": dict(T=40, D=32, H=32, E=6, K=2, act="gelu_tanh", dtype="float32", pattern="subset"),
    "all_masked": dict(T=17, D=32, H=32, E=3, K=2, act="swiglu", dtype="float32", pattern="all_masked"),
    "skewed_multi_tile": dict(T=90, D=32, H=32, E=4, K=1, act="gelu_tanh", dtype="bfloat16", pattern="skewed"),
    "odd_dims": dict(T=23, D=20, H=12, E=3, K=2, act="gelu_tanh", dtype="float32"),
    "odd_dims_swiglu_bf16": dict(T=29, D=24, H=20, E=3, K=2, act="swiglu", dtype="bfloat16"),
    "negative_index_dropped": dict(T=25, D=32, H=32, E=4, K=4, act="gelu_tanh", dtype="float32",
                                   pattern="expert_choice"),
    "frozen_weights": dict(T=26, D=32, H=32, E=3, K=2, act="swiglu", dtype="float32", grads="x_cw"),
    "gmm_gelu_bf16": dict(T=37, D=64, H=32, E=4, K=2, act="gelu_tanh", dtype="bfloat16", backend="grouped_mm"),
    "gmm_swiglu_bf16_subset": dict(T=30, D=32, H=32, E=5, K=2, act="swiglu", dtype="bfloat16",
                                   backend="grouped_mm", pattern="subset"),
    "hybrid_swiglu_bf16_bias": dict(T=37, D=32, H=48, E=4, K=2, act="swiglu", dtype="bfloat16", backend="hybrid"),
    "hybrid_gelu_bf16_subset": dict(T=30, D=40, H=24, E=5, K=2, act="gelu_tanh", dtype="bfloat16", backend="hybrid",
                                    pattern="subset"),
    "triton_wgrad_in_kernel_gather": dict(T=37, D=48, H=40, E=4, K=2, act="gelu_tanh", dtype="float32",
                                          pregather={"dw1": False, "dw2": False}),
    "triton_wgrad_pregathered": dict(T=37, D=48, H=40, E=4, K=2, act="swiglu", dtype="float32",
                                     pregather={"dw1": True, "dw2": True}),
    "gmm_all_masked": dict(T=9, D=32, H=32, E=3, K=1, act="gelu_tanh", dtype="bfloat16", backend="grouped_mm",
                           pattern="all_masked"),
}
# Decode shapes: at most DECODE_ROWS_PER_EXPERT rows per expert and H >= 2 x BK, so GEMM2 splits K (decode_split_k)
CASES.update({
    "decode_split_k_gelu_bias": dict(T=2, D=32, H=96, E=4, K=2, act="gelu_tanh", dtype="float32"),
    "decode_split_k_swiglu_odd_h": dict(T=3, D=24, H=80, E=5, K=2, act="swiglu", dtype="float32"),
    # 4 chunks asked for, but chunks rounded up to whole K tiles (32 rows here) cover H=130 in 3: a 4th partial
    # allocated and summed but never written would add garbage (on a GPU: Qwen2-MoE's H=1408, 8 chunks asked, 6)
    "decode_split_k_uneven_chunks": dict(T=2, D=24, H=130, E=4, K=2, act="gelu_tanh", dtype="float32"),
})

DETERMINISM_CASES = {
    "det_swiglu_bf16": dict(T=50, D=32, H=32, E=4, K=2, act="swiglu", dtype="bfloat16"),
    "det_hybrid_swiglu_bf16": dict(T=50, D=32, H=32, E=4, K=2, act="swiglu", dtype="bfloat16", backend="hybrid"),
    "det_gmm_gelu_bf16": dict(T=50, D=32, H=32, E=4, K=2, act="gelu_tanh", dtype="bfloat16", backend="grouped_mm"),
}
GPU_CASES = {
    "gpu_gelu_bf16": dict(T=1000, D=256, H=512, E=8, K=2, act="gelu_tanh", dtype="bfloat16"),
    "gpu_swiglu_bf16": dict(T=1000, D=256, H=384, E=8, K=2, act="swiglu", dtype="bfloat16"),
    "gpu_gelu_f32_tf32": dict(T=700, D=192, H=256, E=8, K=2, act="gelu_tanh", dtype="float32"),
    "gpu_swiglu_f32_tf32": dict(T=700, D=192, H=256, E=8, K=2, act="swiglu", dtype="float32"),
    "gpu_gelu_fp16": dict(T=800, D=128, H=512, E=4, K=1, act="gelu_tanh", dtype="float16"),
    "gpu_big_bf16": dict(T=4096, D=512, H=2048, E=8, K=2, act="gelu_tanh", dtype="bfloat16", scale=True),
    "gpu_finegrained_bf16": dict(T=2048, D=384, H=128, E=64, K=8, act="swiglu", dtype="bfloat16", bias=False),
    "gpu_skewed_bf16": dict(T=3000, D=256, H=512, E=16, K=2, act="swiglu", dtype="bfloat16", pattern="skewed"),
    "gpu_odd_dims_bf16": dict(T=555, D=200, H=300, E=5, K=2, act="gelu_tanh", dtype="bfloat16"),
    "gpu_subset_bf16": dict(T=999, D=128, H=256, E=32, K=2, act="gelu_tanh", dtype="bfloat16", pattern="subset"),
    "gpu_gmm_gelu_bf16": dict(T=1000, D=256, H=512, E=8, K=2, act="gelu_tanh", dtype="bfloat16",
                              backend="grouped_mm"),
    "gpu_gmm_swiglu_bf16_subset": dict(T=999, D=256, H=256, E=32, K=2, act="swiglu", dtype="bfloat16",
                                       backend="grouped_mm", pattern="subset"),
    "gpu_hybrid_gelu_bf16": dict(T=1000, D=256, H=512, E=8, K=2, act="gelu_tanh", dtype="bfloat16", backend="hybrid"),
    "gpu_hybrid_swiglu_subset": dict(T=999, D=256, H=256, E=32, K=2, act="swiglu", dtype="bfloat16",
                                     backend="hybrid", pattern="subset"),
    "gpu_auto_bf16": dict(T=2048, D=512, H=1024, E=8, K=2, act="swiglu", dtype="bfloat16", backend="auto"),
    # decode shapes (at most DECODE_ROWS_PER_EXPERT rows per expert): the short, narrow decode tiles
    "gpu_decode_one_token_bf16": dict(T=1, D=256, H=1024, E=4, K=2, act="gelu_tanh", dtype="bfloat16"),
    "gpu_decode_wide_swiglu_bf16": dict(T=3, D=320, H=4608, E=8, K=2, act="swiglu", dtype="bfloat16"),
    "gpu_decode_batch_odd_fp16": dict(T=32, D=200, H=300, E=4, K=2, act="gelu_tanh", dtype="float16"),
    "gpu_triton_pregather_bf16": dict(T=1000, D=256, H=512, E=8, K=2, act="gelu_tanh", dtype="bfloat16",
                                      pregather={"dw1": True, "dw2": False}),
    "gpu_gmm_skewed": dict(T=3000, D=256, H=512, E=16, K=2, act="swiglu", dtype="bfloat16", pattern="skewed",
                           backend="grouped_mm", bias=False),
}
GPU_DETERMINISM_CASES = {
    "gpu_det_big_bf16": dict(T=4096, D=512, H=1024, E=8, K=2, act="swiglu", dtype="bfloat16"),
    "gpu_det_gmm_bf16": dict(T=4096, D=512, H=1024, E=8, K=2, act="swiglu", dtype="bfloat16", backend="grouped_mm"),
    "gpu_det_hybrid_bf16": dict(T=4096, D=512, H=1024, E=8, K=2, act="gelu_tanh", dtype="bfloat16", backend="hybrid"),
    "gpu_det_f32": dict(T=2048, D=256, H=512, E=8, K=2, act="gelu_tanh", dtype="float32"),
}


def _tol(dtype: torch.dtype, device: str) -> float:
    """Relative-norm tolerance vs an fp64 reference."""
    if dtype == torch.bfloat16:
        return 3e-2
    if dtype == torch.float16:
        return 5e-3
    return 1e-5 if device == "cpu" else 5e-3  # GPU fp32 uses tf32 dots


def make_inputs(case: dict, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T, D, H, E, K = (case[k] for k in "TDHEK")
    act, dtype = case["act"], getattr(torch, case["dtype"])
    bias = case.get("bias", True)
    pattern = case.get("pattern", "random")
    H1 = 2 * H if act == "swiglu" else H
    x = torch.randn(T, D, generator=g)
    w1 = torch.randn(E, D, H1, generator=g) / D ** 0.5
    w2 = torch.randn(E, H, D, generator=g) / H ** 0.5
    b1 = torch.randn(E, H1, generator=g) * 0.1 if bias else None
    b2 = torch.randn(E, D, generator=g) * 0.1 if bias else None
    logits = torch.randn(T, E, generator=g)
    if pattern == "subset":  # only experts 1 and E-2 receive tokens
        allowed = torch.zeros(E, dtype=torch.bool)
        allowed[[1, E - 2]] = True
        logits = logits.masked_fill(~allowed, -1e9)
    if pattern == "skewed":  # most tokens prefer expert 0
        logits[:, 0] += 4.0
    probs = torch.softmax(logits, -1)
    if pattern == "expert_choice":  # K = E slots, slot e means expert e, many not taken (-1)
        ei = torch.arange(E).repeat(T, 1)
        keep = torch.rand(T, E, generator=g) < 0.4
        cw = probs * keep
        ei = torch.where(keep, ei, torch.full_like(ei, -1))
    else:
        cw, ei = probs.topk(K, -1)
        keep = torch.rand(T, K, generator=g) > 0.2
        if pattern == "all_masked":
            keep[:] = False
        if pattern == "all_kept":
            keep[:] = True
        if pattern == "subset":
            keep &= cw > 1e-6
        cw = cw * keep
    ts = [x, cw, w1, b1, w2, b2]
    ts = [None if t is None else t.to(dtype).to(device) for t in ts]
    return ts, ei.to(device), keep.to(device)


def run_case(case: dict, device: str, seed: int = 0) -> dict:
    """Run fused_moe forward+backward and the fp64 reference; return relative errors."""
    (x, cw, w1, b1, w2, b2), ei, keep = make_inputs(case, device, seed)
    act = case["act"]
    backend = case.get("backend", "triton")
    grads = case.get("grads", "all")
    names = ["x", "cw", "w1", "b1", "w2", "b2"]
    params = [x, cw, w1, b1, w2, b2]
    want = [p is not None and (grads == "all" or n in ("x", "cw")) for n, p in zip(names, params)]
    for p, w in zip(params, want):
        if w:
            p.requires_grad_(True)
    fm = importlib.import_module("zoo.kernels.fused_moe")
    saved_flags = dict(fm.WGRAD_PREGATHER)
    fm.WGRAD_PREGATHER.update(case.get("pregather", {}))
    try:
        y = fused_moe(x, ei, cw, keep, w1, b1, w2, b2, act, backend=backend)
        assert y.dtype == x.dtype and y.shape == x.shape
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(y.dtype).to(device)
        got = torch.autograd.grad(y, [p for p, w in zip(params, want) if w], dy, allow_unused=False)
    finally:
        fm.WGRAD_PREGATHER.update(saved_flags)
    ref_params = [None if p is None else p.detach().double().requires_grad_(w) for p, w in zip(params, want)]
    yr = reference_moe(ref_params[0], ei, ref_params[1], keep, *ref_params[2:4], *ref_params[4:6], act)
    ref_inputs = [p for p, w in zip(ref_params, want) if w]
    if yr.requires_grad:
        refg = torch.autograd.grad(yr, ref_inputs, dy.double(), allow_unused=True)
    else:  # nothing kept: the reference output is a constant zero
        refg = [None] * len(ref_inputs)
    out = {}

    def rel(a, b):
        a = a.detach().double().cpu()
        b = torch.zeros_like(a) if b is None else b.detach().double().cpu()
        if not torch.isfinite(a).all():
            return float("inf")
        nb = b.norm().item()
        if nb == 0:
            return 0.0 if a.norm().item() == 0 else float("inf")
        return (a - b).norm().item() / nb

    out["y"] = rel(y, yr)
    for n, a, b in zip([n for n, w in zip(names, want) if w], got, refg):
        out["d" + n] = rel(a, b)
    return out


def run_determinism(case: dict, device: str) -> bool:
    outs = []
    for _ in range(2):
        (x, cw, w1, b1, w2, b2), ei, keep = make_inputs(case, device, seed=3)
        params = [p for p in (x, cw, w1, b1, w2, b2) if p is not None]
        for p in params:
            p.requires_grad_(True)
        y = fused_moe(x, ei, cw, keep, w1, b1, w2, b2, case["act"], backend=case.get("backend", "triton"))
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype).to(device)
        outs.append([y.detach()] + list(torch.autograd.grad(y, params, dy)))
    return all(torch.equal(a, b) for a, b in zip(*outs))


def _check(name: str, case: dict, errs: dict, device: str):
    tol = _tol(getattr(torch, case["dtype"]), device)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{name}: errors over tol {tol}: {bad} (all: {errs})"


def _gmm_ok(device: str) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device == "cuda":
        return torch.cuda.get_device_capability()[0] >= 9
    return True


# ------------------------------------------------------------------ CPU: interpreter worker
def _worker(names: list[str]) -> dict:
    fm = importlib.import_module("zoo.kernels.fused_moe")

    assert type(fm._gemm1_kernel).__name__ == "InterpretedFunction", "kernels are not interpreted"
    assert type(fm._wgrad_kernel).__name__ == "InterpretedFunction"
    res = {}
    for name in names:
        t0 = time.time()
        try:
            if name == "route":
                res[name] = {"ok": _route_check("cpu"), "sec": time.time() - t0}
                continue
            if name in OP_CHECKS:
                OP_CHECKS[name]("cpu")
                res[name] = {"ok": True, "sec": time.time() - t0}
                continue
            if name in DETERMINISM_CASES:
                case = DETERMINISM_CASES[name]
                if case.get("backend") in ("grouped_mm", "hybrid") and not _gmm_ok("cpu"):
                    res[name] = {"skip": "torch._grouped_mm missing"}
                    continue
                res[name] = {"det": run_determinism(case, "cpu"), "sec": time.time() - t0}
                continue
            case = CASES[name]
            if case.get("backend") in ("grouped_mm", "hybrid") and not _gmm_ok("cpu"):
                res[name] = {"skip": "torch._grouped_mm missing"}
                continue
            res[name] = {"errs": run_case(case, "cpu"), "sec": time.time() - t0}
        except Exception as ex:  # reported by the parent test
            import traceback

            res[name] = {"error": f"{type(ex).__name__}: {ex}\n{traceback.format_exc()}"}
    return res


def _route_check(device: str) -> bool:
    """route() against a stable sort: permutation, expert per sorted row, counts, starts and valid flags, with
    dropped slots, out-of-range expert indices (-1, E) and several programs' worth of slots."""
    from zoo.kernels.fused_moe import route

    g = torch.Generator().manual_seed(5)
    ok = True
    for T, K, E in [(1, 1, 1), (37, 2, 5), (300, 3, 7), (64, 8, 128), (700, 2, 3)]:
        ei = torch.randint(-1, E + 1, (T, K), generator=g)
        keep = torch.rand(T, K, generator=g) > 0.3
        meta = route(ei.to(device), keep.to(device), E)
        valid = keep & (ei >= 0) & (ei < E)
        key = torch.where(valid, ei, E).reshape(-1)
        order = torch.sort(key, stable=True).indices.to(torch.int32)
        counts = torch.bincount(key, minlength=E + 1)[:E].to(torch.int32)
        starts = torch.cumsum(counts, 0) - counts
        ok &= torch.equal(meta.sorted_slot.cpu(), order)
        ok &= torch.equal(meta.e_row.cpu(), key[order.long()].to(torch.int32))
        ok &= torch.equal(meta.slot_row.cpu(), torch.argsort(order).to(torch.int32))
        ok &= torch.equal(meta.valid.cpu(), valid.reshape(-1).to(torch.uint8))
        ok &= torch.equal(meta.counts.cpu(), counts) and torch.equal(meta.starts.cpu(), starts.to(torch.int32))
    return bool(ok)


def _opcheck(device: str) -> None:
    """torch.library.opcheck on the forward and backward custom ops (schema, fake implementations against real
    outputs, autograd registration, AOT dispatch): what torch.compile relies on to take the op into a graph.
    opcheck compares every output of two runs, so the cases leave no buffer row unwritten: every slot kept (the rows
    of dropped slots are never written, as nothing reads them) and T*K a multiple of 4 (the routing buffer's
    alignment padding)."""
    fm = importlib.import_module("zoo.kernels.fused_moe")
    gelu = dict(T=38, D=48, H=40, E=4, K=2, act="gelu_tanh", dtype="float32", pattern="all_kept")
    swiglu_bf16 = dict(T=30, D=32, H=32, E=5, K=2, act="swiglu", dtype="bfloat16", pattern="all_kept")
    for case, backend in ((gelu, "triton"), (swiglu_bf16, "grouped_mm")):
        if backend == "grouped_mm" and not _gmm_ok(device):
            continue
        (x, cw, w1, b1, w2, b2), ei, keep = make_inputs(case, device)
        ts = [None if t is None else t.requires_grad_(True) for t in (x, cw, w1, b1, w2, b2)]
        swiglu = case["act"] == "swiglu"
        torch.library.opcheck(fm.fused_moe_forward, (*ts[:6], ei, keep, swiglu, backend, True))
        y, buf, valid, hpre, act = fm.fused_moe_forward(*(None if t is None else t.detach() for t in ts), ei, keep,
                                                        swiglu, backend, True)
        needs = [t is not None for t in ts]
        torch.library.opcheck(fm.fused_moe_backward, (torch.randn_like(y), *(None if t is None else t.detach()
                                                                            for t in ts), ei, valid, buf, hpre, act,
                                                      swiglu, backend, needs),
                              test_utils=("test_schema", "test_faketensor"))


def _compiled_matches_eager(device: str, backend: str = "aot_eager", mode: str | None = None) -> None:
    """fused_moe inside a torch.compile'd function is one graph (fullgraph: no break at the op) and gives exactly
    the eager outputs and gradients."""
    case = CASES["odd_dims_swiglu_bf16"] if device == "cuda" else CASES["gelu_f32"]
    (x, cw, w1, b1, w2, b2), ei, keep = make_inputs(case, device)
    ts = [t.requires_grad_(True) for t in (x, cw, w1, b1, w2, b2)]

    def f(x, cw, w1, b1, w2, b2):
        return fused_moe(x, ei, cw, keep, w1, b1, w2, b2, case["act"], backend="triton").float().square().sum()

    compiled = torch.compile(f, backend=backend, mode=mode, fullgraph=True)
    ref = [f(*ts)] + list(torch.autograd.grad(f(*ts), ts))
    for _ in range(3):  # warm-up, recording and replay under CUDA graphs
        got = [compiled(*ts)]
        got += list(torch.autograd.grad(got[0], ts))
        bad = [i for i, (a, b) in enumerate(zip(got, ref)) if not torch.equal(a, b)]
        assert not bad, f"compiled differs from eager in outputs {bad} (0 = y, then d x, cw, w1, b1, w2, b2)"


def _layer_compiled_matches_eager(device: str, dtype: torch.dtype = torch.float32) -> None:
    """The MoE layer on the fused path with its routing compiled (on CUDA also replayed as a CUDA graph): routing,
    losses, statistics and the fused experts are ONE graph, with the eager layer's outputs and gradients; two
    forwards before one backward (LIMoE's image and text passes), several steps in a row and parameter gradients
    accumulated over two steps (the CUDA graph pool is reused by the next step) included."""
    from zoo.moe import MoEConfig, MoELayer

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    kwargs = dict(num_experts=4, top_k=2, group_size=2, dispatch="fused", activation="gelu_tanh",
                  z_loss_weight=1e-3)
    torch.manual_seed(0)
    eager = MoELayer(16, 24, MoEConfig(**kwargs, compile_routing=False)).to(device, dtype).train()
    compiled = MoELayer(16, 24, MoEConfig(**kwargs, compile_routing=True)).to(device, dtype).train()
    compiled.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 10, 16, generator=g).to(device, dtype) for _ in range(2)]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for step in range(4):  # warm-up, CUDA graph recording, replays
        results = []
        for layer in (eager, compiled):
            if step != 2:  # step 2 accumulates onto step 1's parameter gradients
                layer.zero_grad(set_to_none=True)
            layer.router.generator = torch.Generator(device).manual_seed(step)
            inputs = [x.clone().requires_grad_(True) for x in xs]
            ys, loss = [], 0.0
            for x in inputs:  # two forwards, then one backward
                ys.append(layer(x))
                loss = loss + ys[-1].float().square().sum() + layer.aux.loss
            loss.backward()
            results.append([y.detach() for y in ys] + [layer.aux.loss.detach(), layer.aux.stats.tokens_per_expert]
                           + [x.grad for x in inputs] + [p.grad for p in layer.parameters()])
        for i, (a, b) in enumerate(zip(*results)):
            torch.testing.assert_close(b, a, **tol, msg=lambda m: f"step {step}, result {i}: {m}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, dict(torch._dynamo.utils.counters["stats"])


def _helpers_check(device: str) -> None:
    """The grouped_mm backend's per-expert helpers: the bias-gradient segment sum (rows split over several programs,
    partials summed in a fixed order) against torch, and the in-place zeroing of empty experts' weight gradients,
    which must overwrite those experts (even NaN garbage) and leave every other expert's values untouched."""
    fm = importlib.import_module("zoo.kernels.fused_moe")
    g = torch.Generator().manual_seed(3)
    T, K, E, N = 70, 2, 5, 45
    ei = torch.randint(0, E, (T, K), generator=g)
    ei[ei == 3] = 1  # expert 3 gets no rows
    keep = torch.rand(T, K, generator=g) > 0.2
    meta = fm.route(ei.to(device), keep.to(device), E)
    src = torch.randn(T * K, N, generator=g)
    got = fm._segsum(src.to(device), meta, torch.float32).cpu()
    counts = meta.counts.cpu().long()
    want = torch.stack([src[s:s + c].sum(0) for s, c in zip(meta.starts.cpu().long(), counts)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counts[3] == 0 and torch.equal(got[3], torch.zeros(N)), "an empty expert's segment sum must be 0"
    w = torch.randn(E, 33, 70, generator=g)  # 2310 elements per expert: not a multiple of the block
    w[3] = float("nan")
    before = w.clone()
    out = fm._zero_empty_groups(w.to(device), meta.counts).cpu()
    assert torch.equal(out[3], torch.zeros(33, 70)), "the empty expert was not zeroed"
    keep_e = [e for e in range(E) if e != 3]
    assert torch.equal(out[keep_e], before[keep_e]), "a non-empty expert's gradient was changed"


OP_CHECKS = {"opcheck": _opcheck, "compiled": _compiled_matches_eager, "layer_compiled": _layer_compiled_matches_eager,
             "helpers": _helpers_check}


@pytest.fixture(scope="module")
def interp_results():
    names = list(CASES) + list(DETERMINISM_CASES) + ["route"] + list(OP_CHECKS)
    halves = [names[0::2], names[1::2]]  # two workers: CI machines have 2 cores
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", ",".join(h)], env=env, cwd=str(REPO),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for h in halves]
    res = {}
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, f"interpreter worker failed:\n{err[-4000:]}"
        res.update(json.loads(out.strip().splitlines()[-1]))
    return res


def _interp_result(res: dict, name: str) -> dict:
    r = res[name]
    if "skip" in r:
        pytest.skip(r["skip"])
    assert "error" not in r, r.get("error")
    return r


@pytest.mark.skipif(HAS_CUDA, reason="CUDA present: the cases run natively in test_cuda_case")
@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(interp_results, name):
    r = _interp_result(interp_results, name)
    _check(name, CASES[name], r["errs"], "cpu")


@pytest.mark.skipif(HAS_CUDA, reason="CUDA present: runs natively in test_cuda_determinism")
@pytest.mark.parametrize("name", list(DETERMINISM_CASES))
def test_interpreted_determinism(interp_results, name):
    r = _interp_result(interp_results, name)
    assert r["det"], f"{name}: two runs differ"


@pytest.mark.skipif(HAS_CUDA, reason="CUDA present: runs natively in test_cuda_route")
def test_interpreted_route(interp_results):
    r = _interp_result(interp_results, "route")
    assert r["ok"], "counting sort differs from a stable sort"


@pytest.mark.skipif(HAS_CUDA, reason="CUDA present: runs natively in test_cuda_op_checks")
@pytest.mark.parametrize("name", list(OP_CHECKS))
def test_interpreted_op_checks(interp_results, name):
    assert _interp_result(interp_results, name)["ok"]


# ------------------------------------------------------------------ CUDA: native
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (on CPU the same checks run interpreted)")
def test_cuda_opcheck():
    _opcheck("cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (on CPU the same check runs interpreted, through aot_eager)")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cuda_compiled_matches_eager(mode):
    """Inductor around the op; with "reduce-overhead" its kernels are captured and replayed as a CUDA graph."""
    _compiled_matches_eager("cuda", backend="inductor", mode=mode)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (on CPU the same check runs interpreted, without CUDA graphs)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_layer_compiled_matches_eager(dtype):
    _layer_compiled_matches_eager("cuda", dtype)



@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (on CPU the same cases run interpreted)")
@pytest.mark.parametrize("name", list(CASES) + list(GPU_CASES))
def test_cuda_case(name):
    case = {**CASES, **GPU_CASES}[name]
    if case.get("backend") in ("grouped_mm", "hybrid") and not _gmm_ok("cuda"):
        pytest.skip("torch._grouped_mm backend needs sm90+")
    _check(name, case, run_case(case, "cuda"), "cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (on CPU the same cases run interpreted)")
@pytest.mark.parametrize("name", list(DETERMINISM_CASES) + list(GPU_DETERMINISM_CASES))
def test_cuda_determinism(name):
    case = {**DETERMINISM_CASES, **GPU_DETERMINISM_CASES}[name]
    if case.get("backend") in ("grouped_mm", "hybrid") and not _gmm_ok("cuda"):
        pytest.skip("torch._grouped_mm backend needs sm90+")
    assert run_determinism(case, "cuda"), f"{name}: two runs differ"


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_route():
    assert _route_check("cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (on CPU the same check runs interpreted)")
def test_cuda_helpers():
    _helpers_check("cuda")


# ------------------------------------------------------------------ anywhere: argument checks
def test_decode_shapes_take_tiles_that_fill_the_gpu(monkeypatch):
    """A decode step of Phi-2x4 (T=1, top-2 of 4 experts, D=2560, H=10240) reads only two experts' weights: with
    the training tiles GEMM2 had 40 programs with work on a 132-SM GPU. The decode tiles give every SM work."""
    fm = importlib.import_module("zoo.kernels.fused_moe")
    monkeypatch.setattr(fm, "_interpret", lambda: False)
    T, K, E, D, H = 1, 2, 4, 2560, 10240
    for kind, n, kd in (("gemm1", H, D), ("gemm2", D, H)):
        cfg = fm._pick_config(kind, T * K / E, n, kd, torch.bfloat16, False)
        assert cfg.BM == 16
        split = fm.decode_split_k(T * K, E, n, kd, cfg) if kind == "gemm2" else 1  # GEMM1 never splits K
        busy_programs = K * -(-n // cfg.BN) * split  # one M tile for each of the two chosen experts
        assert busy_programs >= 132, (kind, cfg, split)
    # GEMM2 reads w2 [E, H, D] along D: 64-column tiles (128-byte rows), its programs from chunks of H
    assert fm._pick_config("gemm2", 0.5, D, H, torch.bfloat16, False).BN == 64
    assert fm.decode_split_k(2, 4, D, H, fm._pick_config("gemm2", 0.5, D, H, torch.bfloat16, False)) > 1
    assert fm.decode_split_k(4096, 4, D, H, fm._pick_config("gemm2", 1024, D, H, torch.bfloat16, False)) == 1
    # the split is the number of whole-tile chunks that cover H (Qwen2-MoE's H = 1408: 8 asked, 6 chunks of 256)
    for h in (1408, 1024, 14336, 10240, 5460, 300):
        cfg = fm._pick_config("gemm2", 0.5, D, h, torch.bfloat16, False)
        split = fm.decode_split_k(2, 4, D, h, cfg)
        assert -(-h // fm._k_chunk(h, split, cfg.BK)) == split, h
    assert fm.decode_split_k(2, 4, D, 1408, fm._pick_config("gemm2", 0.5, D, 1408, torch.bfloat16, False)) == 6
    # the route's one-hot sub-block is no wider than the slots (a 1024-slot block for 2 slots took 8.9 us on the
    # H200); training-size routes keep their 1024-slot blocks
    E_PAD, SB, NSUB, nb = fm._route_layout(2, 8)[:4]
    assert (SB, NSUB, nb) == (16, 1, 1)
    assert fm._route_layout(6656, 4)[1:4] == (1024, 1, 7)
    # past the decode threshold the training tiles stay
    assert fm._pick_config("gemm2", 2 * fm.DECODE_ROWS_PER_EXPERT, D, H, torch.bfloat16, False).BM == 64
    assert fm._pick_config("gemm1", 0.5, H, D, torch.float32, False).BM == 64  # fp32 (tf32) keeps its tiles


def test_available_false_on_cpu():
    assert not fused_moe_available(torch.zeros(2, 2))
    if HAS_CUDA:
        assert fused_moe_available(torch.zeros(2, 2, device="cuda", dtype=torch.bfloat16))
        assert not fused_moe_available(torch.zeros(2, 2, device="cuda", dtype=torch.float64))


def test_argument_errors():
    (x, cw, w1, b1, w2, b2), ei, keep = make_inputs(CASES["gelu_f32"], "cpu")
    with pytest.raises(ValueError, match="activation"):
        fused_moe(x, ei, cw, keep, w1, b1, w2, b2, "relu")
    with pytest.raises(ValueError, match="weight shapes"):
        fused_moe(x, ei, cw, keep, w1, b1, w2, b2, "swiglu")
    with pytest.raises(ValueError, match="b1"):
        fused_moe(x, ei, cw, keep, w1, b1[:, :3], w2, b2, "gelu_tanh")
    with pytest.raises(ValueError, match="expert_index"):
        fused_moe(x, ei[:3], cw, keep, w1, b1, w2, b2, "gelu_tanh")
    with pytest.raises(TypeError):
        fused_moe(x.double(), ei, cw, keep, w1, b1, w2, b2, "gelu_tanh")
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(RuntimeError, match="CUDA"):
            fused_moe(x, ei, cw, keep, w1, b1, w2, b2, "gelu_tanh")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend_case", ["vmoe_capacity", "llm_dropless"])
def test_cuda_layer_training_step_never_syncs_the_host(backend_case):
    """The whole MoELayer training step (noisy BPR routing, capacity, every loss, statistics, fused experts,
    backward) must queue GPU work without waiting for it: a host sync stalls the launch queue every layer."""
    from zoo.moe import MoEConfig, MoELayer

    vmoe = backend_case == "vmoe_capacity"
    cfg = MoEConfig(num_experts=8, top_k=2, router="topk", noise_std=1.0 if vmoe else 0.0, renormalize=not vmoe,
                    batch_priority=vmoe, capacity_factor=1.05, dropless=not vmoe, group_size=4,
                    activation="gelu_tanh" if vmoe else "swiglu", expert_bias=vmoe, dispatch="fused",
                    importance_loss_weight=0.01, load_loss_weight=0.01 if vmoe else 0.0,
                    switch_loss_weight=0.0 if vmoe else 0.01, z_loss_weight=1e-3)
    layer = MoELayer(64, 128, cfg).cuda().to(torch.bfloat16).train()
    x = torch.randn(8, 50, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):  # warm-up: Triton and torch.compile compile (and may sync), the CUDA graphs are recorded
        y = layer(x)
        torch.autograd.backward([y, layer.aux.loss], [torch.ones_like(y), torch.ones_like(layer.aux.loss)])
        x.grad = None  # the input's gradient is a CUDA graph output, valid until the next step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
        torch.autograd.backward([y, layer.aux.loss], [torch.ones_like(y), torch.ones_like(layer.aux.loss)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_autocast_runs_the_experts_in_bf16():
    """Under bf16 autocast with fp32 weights (Lightning's bf16-mixed), the fused path computes what it computes
    on bf16 inputs and weights, returns bf16 like a matmul would, and gives fp32 weight gradients."""
    (x, cw, w1, b1, w2, b2), ei, keep = make_inputs(CASES["gelu_f32"], "cuda")
    params = [p.detach().clone().requires_grad_(True) for p in (w1, b1, w2, b2)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fused_moe(x, ei, cw, keep, *params, "gelu_tanh")
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    expected = fused_moe(x.bfloat16(), ei, cw.bfloat16(), keep, *(p.detach().bfloat16() for p in params), "gelu_tanh")
    assert torch.equal(y, expected)


if __name__ == "__main__":  # interpreter worker: python test_fused_moe.py --worker name1,name2
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        torch.set_num_threads(1)
        print(json.dumps(_worker(sys.argv[2].split(","))))


@pytest.mark.parametrize("slots", [1200, 700])
def test_fake_forward_does_not_specialise_the_token_count(slots):
    """The custom op's fake implementation (what torch.compile traces) with a symbolic token count: past the routing
    layout's cap (1,024 slots for 4 experts) the buffer layout is a formula valid for every larger count, guarded by a
    range, never ``Eq(T*K, n)``; below it a specialisation is allowed (decode steps have few fixed shapes). A
    specialisation past the cap made a compiled decoder (``DecoderLM.compile_blocks``) compile anew for every sequence
    length of real, variable-length batches, up to dynamo's limit, and then run eagerly."""
    import sympy
    from torch.fx.experimental.proxy_tensor import make_fx

    fm = importlib.import_module("zoo.kernels.fused_moe")
    E, D, H, K = 4, 8, 16, 2
    T = slots // K

    def forward(x, cw, w1, w2, expert_index, keep):
        return fm.fused_moe_forward(x, cw, w1, None, w2, None, expert_index, keep, False, "triton", True)

    args = (torch.randn(T, D), torch.rand(T, K), torch.randn(E, D, H), torch.randn(E, H, D),
            torch.randint(0, E, (T, K)), torch.ones(T, K, dtype=torch.bool))
    graph = make_fx(forward, tracing_mode="symbolic")(*args)
    tokens = next(n for n in graph.graph.nodes if n.op == "placeholder").meta["val"].shape[0].node
    specialised = [g.expr for g in tokens.shape_env.guards
                   if isinstance(g.expr, sympy.Eq) and tokens.expr.free_symbols & g.expr.free_symbols]
    if slots >= 1024:
        assert not specialised
    else:
        assert specialised  # the test can see a specialisation
