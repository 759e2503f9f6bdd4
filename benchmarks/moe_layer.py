#!/usr/bin/env python
"""MoE layer benchmark: the fused Triton expert path against peer implementations, one GPU run.

    python benchmarks/moe_layer.py --out benchmarks/results        # whole grid, writes moe_layer.{json,md,png}
    python benchmarks/moe_layer.py --report benchmarks/results/moe_layer.json   # re-render md/png from json

Each case builds one ``zoo.moe.MoELayer`` (bf16 parameters, training mode).  Every implementation runs
inside that same layer: ours through ``dispatch="fused"`` (the layer's own integration), the peers through
the layer's ``expert_dispatcher`` hook, so router, grouping, auxiliary losses and combine are identical.

Timed per implementation, CUDA events, warm-up first, median over iterations, a fresh routing every
iteration (a pool of different inputs, each with its own skew permutation, plus V-MoE's router noise):
  * layer fwd      y = layer(x)                      (autograd recording, as in training)
  * layer fwd+bwd  y = layer(x); backward(y, aux)    (grads of x, router, experts)
  * experts fwd / fwd+bwd: the dispatcher alone on precomputed routings (fast implementations only)
TFLOP/s use the nominal expert FLOPs 4*T*k*D*H (fwd) and 12*T*k*D*H (fwd+bwd), 6 and 18 for SwiGLU;
'% dense' divides by the bf16 matmul rate measured in the same run (8192^3, random data).
Error: max |y - y_ref| / max |y_ref| on one routing, y_ref = zoo's per-expert loop in fp32.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import importlib
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

# ----------------------------------------------------------------------------------------- the grid
VIT_TOKENS = 197  # 224px / 16 patches + class token
VMOE_MODELS = {"S": (384, 1536), "B": (768, 3072), "L": (1024, 4096)}
LLM_MODELS = {
    "mixtral": dict(D=4096, H=14336, E=8, k=2),
    "olmoe": dict(D=2048, H=1024, E=64, k=8),
    "finegrained": dict(D=1536, H=256, E=128, k=8),
}


def build_grid(profile: str) -> list[dict]:
    """Cases in priority order (the run stops at its deadline; what is left is reported as trimmed)."""
    cases = []

    def vmoe(model, E, k, cf, load, images):
        D, H = VMOE_MODELS[model]
        cases.append(dict(family="vmoe", name=f"V-MoE-{model}/16 E{E} k{k} {'cf' + str(cf) if cf else 'dropless'} "
                          f"{load} T{images * VIT_TOKENS}", D=D, H=H, E=E, k=k, cf=cf, load=load,
                          B=images, S=VIT_TOKENS, act="gelu_tanh", bias=True, group=8))

    def llm(model, T, load):
        m = LLM_MODELS[model]
        seq = min(T, 2048)
        cases.append(dict(family="llm", name=f"{model} E{m['E']} k{m['k']} dropless {load} T{T}", D=m["D"], H=m["H"],
                          E=m["E"], k=m["k"], cf=None, load=load, B=T // seq, S=seq, act="swiglu", bias=False,
                          group=None))

    if profile == "smoke":
        vmoe("B", 8, 2, 1.05, "uniform", 64)
        llm("olmoe", 4096, "uniform")
        return cases
    # first pass: one case of every kind, so a trimmed run still covers the grid's breadth
    vmoe("B", 8, 2, 1.05, "uniform", 64)
    vmoe("B", 8, 2, None, "uniform", 64)
    llm("mixtral", 8192, "uniform")
    llm("olmoe", 16384, "uniform")
    llm("finegrained", 16384, "uniform")
    vmoe("B", 8, 2, 1.05, "zipf", 64)
    vmoe("B", 32, 1, 1.05, "uniform", 64)
    vmoe("S", 8, 2, 1.05, "uniform", 64)
    vmoe("L", 8, 2, 1.05, "uniform", 64)
    llm("mixtral", 8192, "zipf")
    llm("olmoe", 16384, "zipf")
    # second pass: token counts 4K..32K and the remaining V-MoE variants
    vmoe("B", 8, 2, 1.05, "uniform", 160)
    vmoe("B", 8, 2, None, "uniform", 160)
    vmoe("B", 8, 2, 1.05, "uniform", 24)
    vmoe("B", 8, 1, 1.05, "uniform", 64)
    vmoe("B", 32, 2, 1.05, "uniform", 64)
    vmoe("B", 32, 1, None, "uniform", 64)
    vmoe("L", 8, 2, None, "uniform", 64)
    vmoe("S", 8, 2, None, "uniform", 64)
    vmoe("L", 32, 2, 1.05, "zipf", 64)
    llm("mixtral", 4096, "uniform")
    llm("mixtral", 16384, "uniform")
    llm("olmoe", 4096, "uniform")
    llm("olmoe", 32768, "uniform")
    llm("finegrained", 4096, "uniform")
    llm("finegrained", 32768, "uniform")
    llm("finegrained", 16384, "zipf")
    vmoe("B", 32, 1, None, "zipf", 64)
    return cases


def flops(case: dict, T: int) -> tuple[float, float]:
    per = (6 if case["act"] == "swiglu" else 4) * T * case["k"] * case["D"] * case["H"]
    return per, 3 * per


# ----------------------------------------------------------------------------------------- helpers
def cuda_time(fn, n_warm: int, n_iter: int) -> float:
    """Median milliseconds of fn(i) over n_iter calls, CUDA events around each call."""
    return statistics.median(cuda_times(fn, n_warm, n_iter))


def cuda_times(fn, n_warm: int, n_iter: int) -> list[float]:
    """Milliseconds of each of n_iter calls fn(n_warm + i) after n_warm warm-up calls, CUDA events around each."""
    for i in range(n_warm):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(n_iter):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn(n_warm + i)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def dense_rate() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time(lambda i: a @ b, 5, 30)
    return 2 * n ** 3 / ms / 1e9


def make_layer(case: dict):
    from zoo.moe import MoEConfig, MoELayer

    vmoe = case["family"] == "vmoe"
    cfg = MoEConfig(num_experts=case["E"], top_k=case["k"], router="topk", noise_std=1.0 if vmoe else 0.0,
                    renormalize=not vmoe, batch_priority=vmoe, capacity_factor=case["cf"] or 1.05,
                    dropless=case["cf"] is None, group_size=case["group"], activation=case["act"],
                    expert_bias=case["bias"], dispatch="fused")
    torch.manual_seed(0)
    layer = MoELayer(case["D"], case["H"], cfg).cuda().to(torch.bfloat16).train()
    return layer


def input_pool(case: dict, layer, n: int, zipf_s: float = 1.2) -> list:
    """n different inputs [B, S, D]; with load 'zipf' each adds a vector that shifts the router logits by
    -s*log(rank) for a random permutation of the experts (a Zipf-like skew, fresh per input)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    W = layer.router.proj.weight.float()  # [E, D]
    pinv = W.T @ torch.linalg.inv(W @ W.T)  # [D, E]
    E = case["E"]
    xs = []
    for i in range(n):
        x = torch.randn(case["B"], case["S"], case["D"], device="cuda", generator=g)
        if case["load"] == "zipf":
            perm = torch.randperm(E, device="cuda", generator=g)
            shift = -zipf_s * torch.log(torch.arange(1, E + 1, device="cuda", dtype=torch.float32))[perm]
            x = x + (pinv @ shift)[None, None, :]
        xs.append(x.detach().to(torch.bfloat16).requires_grad_(True))  # detached: no graph into the router
    return xs


def routing_flat(layer, x):
    with torch.no_grad():
        (xg, vg, _), _ = layer._group(x.detach(), torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), None)
        cfg = layer.config
        r = layer.router(xg, vg, cfg.k(True), cfg.capacity_setting(True))
        K = r.expert_index.shape[-1]
        return (xg.reshape(-1, xg.shape[-1]), r.expert_index.reshape(-1, K), r.combine_weight.reshape(-1, K).to(x.dtype),
                r.keep.reshape(-1, K))


def peak_mb(fn, calls: int = 1) -> float:
    """Peak memory (MB above what was allocated before) over ``calls`` calls of fn(i). Measure a layer with its CUDA
    graphs off: a replay allocates nothing (its memory is the graph pool's, allocated while recording)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for i in range(calls):
        fn(i)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def dense_mlp_ms(case: dict, T: int, n_warm: int, n_iter: int) -> dict:
    """The same nominal work without experts or routing: ONE dense bf16 MLP (zoo.layers.Mlp: cuBLAS GEMMs, the same
    activation and biases) over T*k rows, forward+backward with every gradient, timed eagerly and as a CUDA graph
    replay. What a GEMM library reaches on these shapes, so a reference for the % of the 8192^3 rate."""
    from zoo.layers import Mlp

    R = T * case["k"]
    torch.manual_seed(2)
    mlp = Mlp(case["D"], case["H"], case["act"], bias=case["bias"]).cuda().to(torch.bfloat16)
    x = torch.randn(R, case["D"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(R, case["D"], device="cuda", dtype=torch.bfloat16)

    def fb(i=0):
        x.grad = None
        mlp.zero_grad(set_to_none=True)
        mlp(x).backward(dy)

    return dict(eager_ms=cuda_time(fb, n_warm, n_iter), graph_ms=graph_replay_ms(fb, (), n_warm, n_iter))


# ----------------------------------------------------------------------------------------- one case
IMPLS = [  # key, name, runs the whole layer, runs the experts alone
    ("auto", "fused (ours, auto)", True, True),
    ("triton", "fused (ours, triton fwd+bwd)", False, True),
    ("hybrid", "fused (ours, triton fwd + grouped_mm bwd)", False, True),
    ("gmm", "fused (ours, grouped_mm fwd+bwd)", False, True),
    ("loop", "per-expert loop", True, False),
    ("hf", "HF-style torch._grouped_mm", True, True),
    ("einsum", "V-MoE one-hot einsum", True, True),
    ("moeops", "moe-ops", True, True),
    ("sonic", "SonicMoE", True, True),
]
OURS = "fused (ours, auto)"


def make_impl(key: str, case: dict, layer, avail: dict):
    """(dispatcher for the layer hook or None for the layer's own fused path, dispatcher for experts-only)."""
    import moe_peers as P

    T = case["B"] * case["S"]
    if key == "auto":
        return None, P.ours("auto")
    if key in ("triton", "hybrid"):
        return None, P.ours(key)
    if key == "gmm":
        return None, P.ours("grouped_mm")
    if key == "loop":
        return P.loop(), None
    if key == "hf":
        d = P.hf_grouped_mm()
        return d, d
    if key == "einsum":
        if case["cf"] is None:
            return "skip", "dropless: the one-hot dispatch needs a capacity"
        from zoo.moe import compute_capacity

        S = case["group"] * case["S"]
        G = T // S
        d = P.einsum(G, S, compute_capacity(S, case["E"], case["k"], case["cf"], layer.config.capacity_multiple_of))
        return d, d
    if key == "moeops":
        if avail.get("moe-ops") is not True:
            return "skip", "not installed"
        d = P.MoeOpsPeer(layer.experts)
        return d, d
    if key == "sonic":
        if avail.get("sonic-moe") is not True:
            return "skip", "not installed"
        if case["act"] != "swiglu":
            return "skip", "SonicMoE general routing supports GLU activations only"
        d = P.SonicPeer(layer.experts)
        return d, d
    raise KeyError(key)


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def run_case(case: dict, avail: dict, dense: float, args) -> dict:
    from zoo.moe import loop_dispatch

    T = case["B"] * case["S"]
    rec = dict(case, T=T, tokens_per_expert=T * case["k"] / case["E"], impls={}, dense_tflops=dense)
    layer = make_layer(case)
    pool = input_pool(case, layer, args.pool)
    grads = [torch.randn(x.shape, device="cuda", dtype=torch.bfloat16) for x in pool]
    flat = [routing_flat(layer, x) for x in pool]
    x0, ei0, cw0, keep0 = flat[0]
    counts = torch.bincount(ei0[keep0], minlength=case["E"]).float()
    rec["load_max_over_mean"] = (counts.max() / counts.mean()).item()
    rec["kept_fraction"] = keep0.float().mean().item()
    ex32 = copy.deepcopy(layer.experts).float()
    with torch.no_grad():
        y_ref = loop_dispatch(x0.float(), ei0, cw0.float(), keep0, ex32)
    del ex32
    fwd_flops, fb_flops = flops(case, T)
    n_iter = args.iters if fb_flops > 2e12 else args.iters_small
    params = list(layer.parameters())
    xs_req = [(f[0].detach().clone().requires_grad_(True), f[1], f[2].clone().requires_grad_(True), f[3]) for f in flat]
    gflat = [g.reshape(-1, g.shape[-1]) for g in grads]
    keys = [k for k in args.impls.split(",") if k]
    for key, name, do_layer, do_experts in IMPLS:
        if key not in keys:
            continue
        if time.time() > args.deadline:
            rec["impls"][name] = {"skipped": "time"}
            continue
        r = {}
        fwd_only = key in args.fwd_only.split(",")
        try:
            disp, edisp = make_impl(key, case, layer, avail)
            if disp == "skip":
                rec["impls"][name] = {"skipped": edisp}
                continue
            # error on a fixed routing (dispatcher level)
            with torch.no_grad():
                y = (edisp or disp)(x0, ei0, cw0, keep0, layer.experts)
                r["max_err"] = ((y.float() - y_ref).abs().max() / y_ref.abs().max()).item()
                r["finite"] = bool(torch.isfinite(y).all())
            if do_layer:
                layer.expert_dispatcher = disp

                # Each call is a step for the layer's CUDA graphs (MoEConfig.cuda_graphs): a forward whose backward
                # never runs must say so, or every call would record new graphs; and once a process has called
                # cudagraph_mark_step_begin, CUDA graph trees count steps only by it.
                def fwd(i):
                    torch.compiler.cudagraph_mark_step_begin()
                    return layer(pool[i % len(pool)])

                def fwdbwd(i):
                    torch.compiler.cudagraph_mark_step_begin()
                    j = i % len(pool)
                    for p in params:  # fresh grads each step (no accumulation kernels in the timing)
                        p.grad = None
                    pool[j].grad = None
                    y = layer(pool[j])
                    aux = layer.aux.loss
                    if aux.requires_grad:
                        torch.autograd.backward([y, aux], [grads[j], torch.ones_like(aux)])
                    else:
                        y.backward(grads[j])

                if not fwd_only:  # with CUDA graphs a replay allocates nothing: measure the same step without them
                    graphed_config = layer.config
                    layer.config = dataclasses.replace(graphed_config, cuda_graphs=False)
                    try:
                        r["layer_fwdbwd_peak_mb"] = peak_mb(fwdbwd, calls=2)  # the first call compiles
                    finally:
                        layer.config = graphed_config
                r["layer_fwd_ms"] = cuda_time(fwd, args.warm, n_iter)
                if fwd_only:
                    r["note"] = "forward only: " + args.fwd_only_reason
                else:
                    r["layer_fwdbwd_ms"] = cuda_time(fwdbwd, args.warm, n_iter)
            if do_experts:
                d = edisp

                def efwd(i):
                    xx, e, c, k = xs_req[i % len(xs_req)]
                    return d(xx, e, c, k, layer.experts)

                def efb(i):
                    j = i % len(xs_req)
                    xx, e, c, k = xs_req[j]
                    for p in params:
                        p.grad = None
                    xx.grad = c.grad = None
                    d(xx, e, c, k, layer.experts).backward(gflat[j])

                r["experts_fwd_ms"] = cuda_time(efwd, args.warm, n_iter)
                if not fwd_only:
                    r["experts_fwdbwd_ms"] = cuda_time(efb, args.warm, n_iter)
                    r["experts_fwdbwd_peak_mb"] = peak_mb(efb)
                if not fwd_only and args.experts_graph:
                    try:  # GPU time alone, as the layer runs its experts (inside its CUDA graph)
                        r["experts_graph_fwdbwd_ms"] = graph_replay_ms(efb, (0,), args.warm, n_iter)
                    except Exception as ex:  # e.g. a peer that syncs with the host
                        r["experts_graph_error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
            for k2, fl in (("layer_fwd", fwd_flops), ("layer_fwdbwd", fb_flops), ("experts_fwd", fwd_flops),
                           ("experts_fwdbwd", fb_flops), ("experts_graph_fwdbwd", fb_flops)):
                if k2 + "_ms" in r:
                    r[k2 + "_tflops"] = fl / r[k2 + "_ms"] / 1e9
                    r[k2 + "_pct_dense"] = 100 * r[k2 + "_tflops"] / dense
        except Exception as ex:  # a peer failing must not stop the run
            r["error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
            traceback.print_exc()
        finally:
            layer.expert_dispatcher = None
            for p in params:
                p.grad = None
            for x in pool:
                x.grad = None
            for xx, _, c, _ in xs_req:  # gradients captured in a CUDA graph live in its private pool: drop them, or
                xx.grad = c.grad = None  # each impl's pool would stay allocated
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        rec["impls"][name] = r
        print(f"  {name:42s} " + _fmt({k: v for k, v in r.items() if not k.endswith("pct_dense")}), flush=True)
    if case["cf"] is not None and "einsum" in keys and time.time() < args.deadline:
        rec["dispatch"] = time_dispatch_combine(case, layer, flat, args.warm, n_iter)
        print("  dispatch+combine alone (fwd): " + _fmt(rec["dispatch"]), flush=True)
    return rec


def time_dense_mlp(case: dict, rec: dict, args) -> None:
    """rec["dense_mlp"]: :func:`dense_mlp_ms` for the case (run in its own process: see --dense-only)."""
    T = case["B"] * case["S"]
    _, fb_flops = flops(case, T)
    n_iter = args.iters if fb_flops > 2e12 else args.iters_small
    dense = rec["dense_tflops"]
    try:
        d = dense_mlp_ms(case, T, args.warm, n_iter)
        rec["dense_mlp"] = {**d, **{k.replace("_ms", "_pct_dense"): 100 * fb_flops / v / 1e9 / dense
                                    for k, v in d.items()}}
        print("  dense MLP, same nominal work: " + _fmt(rec["dense_mlp"]), flush=True)
    except Exception as ex:
        rec["dense_mlp"] = {"error": f"{type(ex).__name__}: {str(ex)[:200]}"}
        print("  dense MLP failed:", rec["dense_mlp"]["error"], flush=True)
    gc.collect()
    torch.cuda.empty_cache()


def graph_replay_ms(fn, args: tuple, n_warm: int, n_iter: int) -> float:
    """Median ms of replaying ``fn(*args)`` captured once as a CUDA graph: the GPU time of its kernels, without the
    host's launch cost (how the layer runs with MoEConfig.cuda_graphs, and how XLA runs V-MoE's einsums)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles here
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA calls from other threads of this process (compile workers) cannot invalidate the capture. In
    # "global" mode the first capture of one run was invalidated (cause not pinned down), which also left the CUDA RNG
    # in capture state for the rest of that process.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn(*args)
    return cuda_time(lambda i: graph.replay(), n_warm, n_iter)


def time_dispatch_combine(case: dict, layer, flat: list, n_warm: int, n_iter: int) -> dict:
    """Forward time of the capacity dispatch + combine alone (identity experts, same routings), ours vs the one-hot
    einsum: the part of the layer that the dispatch method decides (the expert GEMMs are the same work for both).
    Launched eagerly (fresh routing per call), and as a CUDA graph replay (GPU time, the first routing)."""
    import moe_peers as P
    from zoo.moe import compute_capacity

    T = case["B"] * case["S"]
    S = case["group"] * case["S"]
    C = compute_capacity(S, case["E"], case["k"], case["cf"], layer.config.capacity_multiple_of)
    out = {}
    with torch.no_grad():
        for key, fn in (("ours", P.ours_dispatch_combine()), ("einsum", P.einsum_dispatch_combine(T // S, S, C))):
            out[f"{key}_fwd_ms"] = cuda_time(lambda i: fn(*flat[i % len(flat)], case["E"]), n_warm, n_iter)
            try:
                out[f"{key}_graph_fwd_ms"] = graph_replay_ms(fn, (*flat[0], case["E"]), n_warm, n_iter)
            except Exception as ex:  # e.g. an op that cannot be captured
                out[f"{key}_graph_error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
    out["speedup_vs_einsum"] = out["einsum_fwd_ms"] / out["ours_fwd_ms"]
    if "ours_graph_fwd_ms" in out and "einsum_graph_fwd_ms" in out:
        out["graph_speedup_vs_einsum"] = out["einsum_graph_fwd_ms"] / out["ours_graph_fwd_ms"]
    return out


# ----------------------------------------------------------------------------------------- report
PICK_NAME = {"triton": "fused (ours, triton fwd+bwd)", "hybrid": "fused (ours, triton fwd + grouped_mm bwd)",
             "grouped_mm": "fused (ours, grouped_mm fwd+bwd)"}


def summarize(rec: dict) -> dict:
    """Targets of the issue, per case.  Layer level: the layer's own fused path as run ("fused (ours, auto)").
    Experts level: the backend that zoo.kernels.fused_moe.auto_backend picks for this shape."""
    from zoo.kernels.fused_moe import auto_backend

    im = rec["impls"]
    pick = auto_backend(rec["T"], rec["k"], rec["E"], rec["D"], rec["H"], rec["act"], True)
    out = {"auto_pick": pick}
    # "auto" on the experts alone IS the pick; the pinned-backend rows are only there when they were run.
    ours_by_level = {"layer": im.get(OURS, {}), "experts": im.get(PICK_NAME[pick]) or im.get(OURS, {})}
    ours_by_level["experts_graph"] = ours_by_level["experts"]
    for level in ("layer", "experts", "experts_graph"):
        key = f"{level}_fwdbwd_ms"
        ours = ours_by_level[level]
        peers = {k: v[key] for k, v in im.items() if not k.startswith("fused") and key in v}
        if ours.get(key) and peers:
            fastest = min(peers, key=peers.get)
            out[f"{level}_fastest_peer"] = fastest
            out[f"{level}_speedup_vs_fastest_peer"] = peers[fastest] / ours[key]
            if "V-MoE one-hot einsum" in peers:
                out[f"{level}_speedup_vs_einsum"] = peers["V-MoE one-hot einsum"] / ours[key]
    for key in ("experts_fwdbwd_pct_dense", "experts_graph_fwdbwd_pct_dense"):
        if ours_by_level["experts"].get(key):
            out[f"ours_pick_{key}"] = ours_by_level["experts"][key]
    dm = rec.get("dense_mlp", {})
    if dm.get("graph_ms"):
        out["dense_mlp_graph_pct_dense"] = dm["graph_pct_dense"]
        if ours_by_level["experts"].get("experts_graph_fwdbwd_ms"):
            out["ours_experts_graph_over_dense_mlp"] = ours_by_level["experts"]["experts_graph_fwdbwd_ms"] / dm["graph_ms"]
        if ours_by_level["experts"].get("experts_fwdbwd_ms"):
            out["ours_experts_over_dense_mlp"] = ours_by_level["experts"]["experts_fwdbwd_ms"] / dm["eager_ms"]
        if out.get("layer_fastest_peer"):  # the most a layer built on these GEMMs could gain over the fastest peer
            out["layer_peer_over_dense_mlp"] = im[out["layer_fastest_peer"]]["layer_fwdbwd_ms"] / dm["graph_ms"]
    vals = [v.get("experts_fwdbwd_pct_dense") for k, v in im.items() if k.startswith("fused") and v.get("experts_fwdbwd_pct_dense")]
    if vals:
        out["ours_best_experts_fwdbwd_pct_dense"] = max(vals)
    if im.get(OURS, {}).get("layer_fwdbwd_pct_dense"):
        out["ours_layer_fwdbwd_pct_dense"] = im[OURS]["layer_fwdbwd_pct_dense"]
    return out


def write_report(data: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = data["env"]
    lines = ["# MoE layer benchmark", ""]
    for i, run in enumerate(data.get("runs") or [dict(env=env, dense_tflops=data["dense_tflops"])]):
        e = run["env"]
        lines += [f"- GPU process {i + 1}: {e.get('device')} ({e.get('sm_count')} SMs), driver {e.get('driver')}; torch "
                  f"{e.get('torch')}, triton {e.get('triton')}, python {e.get('python')}; {e.get('date')}; "
                  f"`{e.get('command')}`; dense bf16 matmul (8192^3, random data) measured in that run: "
                  f"{run['dense_tflops']:.0f} TFLOP/s"]
    lines += ["- peers not installed: " + ("; ".join(f"{k}: {v}" for k, v in data["peer_status"].items() if v is not True)
                                           or "none"),
              "- peers installed: " + (", ".join(k for k, v in data["peer_status"].items() if v is True) or "none"),
             "", "Times are medians (ms) over iterations with a fresh routing each; bf16 parameters and activations; "
             "layer = zoo.moe.MoELayer forward (+ backward of output and aux loss); experts = dispatcher alone. "
             "TFLOP/s use nominal expert FLOPs (4/12 T k D H, SwiGLU 6/18). err = max|y-y_ref|/max|y_ref| vs an fp32 "
             "per-expert loop. Peers without capacity support (HF-style, moe-ops, SonicMoE) compute dropped slots "
             "with weight 0. Layer runs use the layer's defaults on CUDA: its routing, losses and statistics are one "
             "torch.compile graph replayed as a CUDA graph (MoEConfig.cuda_graphs), for the peers too (they plug in "
             "as the layer's dispatcher and run eagerly after that graph); on the fused path the expert kernels are "
             "inside that graph. A layer's peak MB is measured on the same layer with its CUDA graphs off (a replay "
             "allocates nothing, its memory is the graph pool's). Experts: the dispatcher alone, launched eagerly "
             "(host launch cost included; with --experts-graph also as a CUDA graph replay). Dense MLP: the same "
             "nominal work as ONE dense bf16 MLP through cuBLAS (no experts, no routing), fwd+bwd, eager and as a "
             "CUDA graph replay, timed in a separate process (--dense-only).", ""]
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    lines += ["## Targets", ""] + data.get("targets_text", []) + [""]
    graphs = any("experts_graph_fwdbwd_ms" in v for r in data["results"] for v in r["impls"].values())
    lines += ["## Summary (fwd+bwd ms; speedup = fastest peer / ours)", "",
              "| case | tokens/expert | ours layer (auto as run) | fastest peer, layer | speedup | auto pick | ours experts "
              "(pick) | fastest peer, experts | speedup | "
              + ("ours experts, CUDA graph | fastest peer, CUDA graph | speedup | ours graph % dense | " if graphs else "")
              + "dense MLP ms (% dense) |", "|---|---|---|---|---|---|---|---|---|" + ("---|" * 4 if graphs else "") + "---|"]
    for rec in data["results"]:
        s, im = rec.get("summary", {}), rec["impls"]
        if not s:
            continue

        def ms(level, name):
            v = im.get(name, {}).get(f"{level}_fwdbwd_ms")
            return f"{v:.2f}" if v else "-"

        pick = PICK_NAME.get(s.get("auto_pick"), "")
        pick = pick if pick in im else OURS  # the pinned-backend row may not have run; "auto" is the pick
        lp, ep = s.get("layer_fastest_peer"), s.get("experts_fastest_peer")
        lines.append(
            f"| {rec['name']} | {rec['tokens_per_expert']:.0f} | {ms('layer', OURS)} | "
            f"{(lp + ' ' + ms('layer', lp)) if lp else '-'} | "
            f"{s['layer_speedup_vs_fastest_peer']:.2f}x | " if s.get("layer_speedup_vs_fastest_peer") else
            f"| {rec['name']} | {rec['tokens_per_expert']:.0f} | {ms('layer', OURS)} | - | - | ")
        gp = s.get("experts_graph_fastest_peer")
        dm = rec.get("dense_mlp", {})
        lines[-1] += (f"{s.get('auto_pick')} | {ms('experts', pick)} | {(ep + ' ' + ms('experts', ep)) if ep else '-'} | "
                      + (f"{s['experts_speedup_vs_fastest_peer']:.2f}x" if s.get("experts_speedup_vs_fastest_peer") else "-")
                      + " | " + ((f"{ms('experts_graph', pick)} | {(gp + ' ' + ms('experts_graph', gp)) if gp else '-'} | "
                                  + (f"{s['experts_graph_speedup_vs_fastest_peer']:.2f}x"
                                     if s.get("experts_graph_speedup_vs_fastest_peer") else "-")
                                  + (f" | {s['ours_pick_experts_graph_fwdbwd_pct_dense']:.0f}% | "
                                     if s.get("ours_pick_experts_graph_fwdbwd_pct_dense") else " | - | "))
                                 if graphs else "")
                      + (f"{dm['graph_ms']:.2f} ({dm['graph_pct_dense']:.0f}%)" if dm.get("graph_ms") else "-") + " |")
    lines.append("")
    disp = [rec for rec in data["results"] if rec.get("dispatch")]
    if disp:
        lines += ["## Capacity dispatch + combine alone (forward ms, identity experts, same routings)", "",
                  "Ours: device counting sort + gather into expert order + deterministic weighted combine (the Triton "
                  "backend folds the gather into GEMM1, so this is an upper bound for it); einsum: the one-hot "
                  "dispatch and combine tensors [G, S, E, C] and their two einsums. Eager: launched from Python, a "
                  "fresh routing per call. CUDA graph: each captured once and replayed (GPU time only), as the layer "
                  "runs with MoEConfig.cuda_graphs and as XLA runs V-MoE's einsums.", "",
                  "| case | ours eager | einsum eager | speedup | ours CUDA graph | einsum CUDA graph | speedup |",
                  "|---|---|---|---|---|---|---|"]
        for rec in disp:
            d = rec["dispatch"]

            def cell(key, fmt="{:.3f}"):
                return fmt.format(d[key]) if key in d else "-"

            lines.append(f"| {rec['name']} | {cell('ours_fwd_ms')} | {cell('einsum_fwd_ms')} | "
                         f"{cell('speedup_vs_einsum', '{:.2f}x')} | {cell('ours_graph_fwd_ms')} | "
                         f"{cell('einsum_graph_fwd_ms')} | {cell('graph_speedup_vs_einsum', '{:.2f}x')} |")
        lines.append("")
    for rec in data["results"]:
        s = rec.get("summary", {})
        lines.append(f"## {rec['name']}")
        lines.append(f"T={rec['T']} D={rec['D']} H={rec['H']} E={rec['E']} k={rec['k']} act={rec['act']}; "
                     f"tokens/expert={rec['tokens_per_expert']:.0f}; load max/mean={rec.get('load_max_over_mean', 0):.2f}; "
                     f"kept={100 * rec.get('kept_fraction', 1):.1f}%")
        lines.append("")
        lines.append("| impl | layer fwd ms | layer fwd+bwd ms | TFLOP/s (fwd+bwd) | % dense | experts fwd ms | "
                     "experts fwd+bwd ms | experts % dense | experts fwd+bwd ms, CUDA graph | % dense | "
                     "layer peak MB (fwd+bwd) | max err |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, r in rec["impls"].items():
            if "note" in r:
                name = f"{name} ({r['note']})"
            if "error" in r or "skipped" in r:
                lines.append(f"| {name} | {r.get('error') or 'skipped: ' + r['skipped']} ||||||||||| ")
                continue

            def f(k, fmt="{:.3f}"):
                return fmt.format(r[k]) if k in r else "-"

            lines.append(f"| {name} | {f('layer_fwd_ms')} | {f('layer_fwdbwd_ms')} | {f('layer_fwdbwd_tflops', '{:.0f}')} | "
                         f"{f('layer_fwdbwd_pct_dense', '{:.0f}%')} | {f('experts_fwd_ms')} | {f('experts_fwdbwd_ms')} | "
                         f"{f('experts_fwdbwd_pct_dense', '{:.0f}%')} | {f('experts_graph_fwdbwd_ms')} | "
                         f"{f('experts_graph_fwdbwd_pct_dense', '{:.0f}%')} | {f('layer_fwdbwd_peak_mb', '{:.0f}')} | "
                         f"{f('max_err', '{:.1e}')} |")
        dm = rec.get("dense_mlp", {})
        if dm.get("graph_ms"):
            lines.append(f"| dense MLP, same nominal work (cuBLAS, no experts) | - | {dm['eager_ms']:.3f} (eager), "
                         f"{dm['graph_ms']:.3f} (CUDA graph) | {dm['graph_pct_dense'] * rec['dense_tflops'] / 100:.0f} | "
                         f"{dm['graph_pct_dense']:.0f}% | - | - | - | - | - | - | - |")
        if s:
            lines.append("")
            lines.append("targets: " + ", ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
        lines.append("")
    if data.get("trimmed"):
        lines += ["", "## Trimmed (not run in this GPU run: time)", ""] + [f"- {n}" for n in data["trimmed"]]
    (out_dir / "moe_layer.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = [r for r in data["results"] if r["impls"]]
        fig, axes = plt.subplots(2, 1, figsize=(max(12, 0.55 * len(recs)), 10), sharex=True)
        every = list(dict.fromkeys(n for r in recs for n in r["impls"]))  # one colour per impl in both panels
        for ax, level in zip(axes, ("layer", "experts")):
            key = f"{level}_fwdbwd_tflops"
            names = [n for n in dict.fromkeys(n for r in recs for n, v in r["impls"].items() if key in v)]
            w = 0.8 / max(1, len(names))
            for i, n in enumerate(names):
                xs, ys = [], []
                for j, r in enumerate(recs):
                    v = r["impls"].get(n, {})
                    if key in v:
                        xs.append(j + i * w)
                        ys.append(v[key])
                ax.bar(xs, ys, w, label=n, color=f"C{every.index(n) % 10}")
            ax.axhline(data["dense_tflops"], color="k", ls="--", lw=1, label="dense bf16 matmul")
            ax.set_ylabel(f"{level} fwd+bwd TFLOP/s (nominal)")
            ax.set_yscale("log")
            ax.set_title(f"{'whole MoE layer' if level == 'layer' else 'experts alone (dispatcher)'}, fwd+bwd, "
                         f"{data['env'].get('device')}")
            ax.legend(fontsize=7, ncol=4)
        axes[-1].set_xticks([j + 0.4 for j in range(len(recs))])
        axes[-1].set_xticklabels([r["name"] for r in recs], rotation=60, ha="right", fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "moe_layer.png", dpi=100)
    except Exception as ex:
        print("chart failed:", ex)


def targets_text(data: dict) -> list[str]:
    out = []
    res = [r for r in data["results"] if r.get("summary")]
    level_names = {"layer": "layer", "experts": "experts (launched eagerly)",
                   "experts_graph": "experts (CUDA graph replays, as the layer runs them)"}
    for level in ("layer", "experts", "experts_graph"):
        sp = [(r["name"], r["summary"][f"{level}_speedup_vs_fastest_peer"], r["summary"][f"{level}_fastest_peer"])
              for r in res if r["summary"].get(f"{level}_speedup_vs_fastest_peer")]
        if sp:
            worst = min(sp, key=lambda t: t[1])
            met = sum(1 for t in sp if t[1] >= 1.25)
            faster = sum(1 for t in sp if t[1] > 1.0)
            out.append(f"- {level_names[level]}: fused >= 1.25x the fastest peer (fwd+bwd): met in {met}/{len(sp)} "
                       f"cases, faster than every peer in {faster}/{len(sp)}; worst {worst[1]:.2f}x ({worst[0]}, vs "
                       f"{worst[2]})" +
                       ("" if met == len(sp) else f"; missed by a factor {1.25 / worst[1]:.2f} in the worst case"))
            if level == "layer":
                bound = [(n, r["summary"]["layer_peer_over_dense_mlp"]) for r in res for n, v, _ in sp
                         if n == r["name"] and v < 1.25 and r["summary"].get("layer_peer_over_dense_mlp")]
                if bound:
                    out.append("  - where missed, the fastest peer's layer time over the dense MLP's (the most a layer "
                               "whose experts cost no more than cuBLAS on one dense matrix could gain): "
                               + ", ".join(f"{n} {b:.2f}x" for n, b in bound))
    for key, how in (("ours_pick_experts_fwdbwd_pct_dense", "experts fwd+bwd launched eagerly"),
                     ("ours_pick_experts_graph_fwdbwd_pct_dense", "experts fwd+bwd as CUDA graph replays")):
        dn = [(r["name"], r["summary"].get(key), r["summary"].get("ours_layer_fwdbwd_pct_dense"))
              for r in res if r["tokens_per_expert"] >= 1024 and r["summary"].get(key)]
        if dn:
            met = sum(1 for t in dn if t[1] >= 70)
            worst = min(dn, key=lambda t: t[1])
            best = max(dn, key=lambda t: t[1])
            out.append(f"- >= 70% of the dense bf16 rate at >= 1024 tokens/expert ({how}, auto pick): met in "
                       f"{met}/{len(dn)}; lowest {worst[1]:.0f}% ({worst[0]}; whole layer {worst[2] or 0:.0f}%), "
                       f"highest {best[1]:.0f}% ({best[0]})")
    dm = [(r["name"], r["summary"]["dense_mlp_graph_pct_dense"], r["summary"].get("ours_experts_graph_over_dense_mlp"),
           r["summary"].get("ours_experts_over_dense_mlp"))
          for r in res if r["tokens_per_expert"] >= 1024 and r["summary"].get("dense_mlp_graph_pct_dense")]
    if dm:
        met = sum(1 for t in dm if t[1] >= 70)
        text = (f"  - reference: ONE dense bf16 MLP doing the same nominal work through cuBLAS (no experts, no routing, "
                f"CUDA graph) reaches 70% of that rate in {met}/{len(dm)} of these cases (lowest "
                f"{min(t[1] for t in dm):.0f}%, highest {max(t[1] for t in dm):.0f}%)")
        for i, how in ((2, "as CUDA graph replays"), (3, "both launched eagerly")):
            ratios = [t[i] for t in dm if t[i]]
            if ratios:
                text += f"; our experts take {min(ratios):.2f}-{max(ratios):.2f}x its time ({how})"
        out.append(text)
    for level in ("layer", "experts", "experts_graph"):
        es = [(r["name"], r["summary"][f"{level}_speedup_vs_einsum"]) for r in res
              if r["summary"].get(f"{level}_speedup_vs_einsum")]
        if es:
            met = sum(1 for t in es if t[1] >= 5)
            worst = min(es, key=lambda t: t[1])
            best = max(es, key=lambda t: t[1])
            out.append(f"- {level_names[level]}: capacity dispatch >= 5x faster than the one-hot einsum (fwd+bwd): met in "
                       f"{met}/{len(es)}; lowest {worst[1]:.2f}x ({worst[0]}), highest {best[1]:.2f}x ({best[0]})")
    for key, how in (("speedup_vs_einsum", "launched eagerly"), ("graph_speedup_vs_einsum", "CUDA graph replays")):
        ds = [(r["name"], r["dispatch"][key]) for r in res if r.get("dispatch", {}).get(key)]
        if ds:
            met = sum(1 for t in ds if t[1] >= 5)
            worst, best = min(ds, key=lambda t: t[1]), max(ds, key=lambda t: t[1])
            out.append(f"- dispatch + combine alone (identity experts, forward, {how}): capacity dispatch >= 5x "
                       f"faster than the one-hot einsum: met in {met}/{len(ds)}; lowest {worst[1]:.2f}x ({worst[0]}), "
                       f"highest {best[1]:.2f}x ({best[0]})")
    return out


# ----------------------------------------------------------------------------------------- main
# Why a peer's wheels may not have been carried to the GPU machine (what earlier runs found; moe_layer_run1.md, run 4)
NOT_CARRIED = {
    "moe-ops": "wheel not carried to this run: moe-ops 0.1.0's backward hits an illegal memory access on the H100 "
               "(runs 1 and 4, which timed its forward only), so it cannot be a forward+backward peer",
    "sonic-moe": "wheels not carried to this run: with nvidia-cutlass-dsl they exceed the GPU machine's 64 MiB transfer "
                 "limit, and in run 1 its CuTe-DSL JIT compilation of the first SwiGLU case had not finished after "
                 "~280 s of a 600 s call",
}


def peer_status() -> dict:
    st = {"MegaBlocks dMoE": "no wheel on PyPI (source only: its CUDA extensions and grouped_gemm would have to be "
                             "compiled on the GPU machine, which the lease's time does not allow)"}
    for name, module, extra in (("moe-ops", "moe_ops", None), ("sonic-moe", "sonicmoe", "sonicmoe.functional")):
        try:
            importlib.import_module(module)
            if extra:
                importlib.import_module(extra)
            st[name] = True
        except ModuleNotFoundError as ex:
            st[name] = NOT_CARRIED[name] if ex.name == module else f"import failed: {ex}"
        except Exception as ex:
            st[name] = f"import failed: {type(ex).__name__}: {str(ex)[:200]}"
    return st


def env_info() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip()
    except Exception:
        drv = "?"
    return dict(device=p.name, sm_count=p.multi_processor_count, driver=drv, torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python " + " ".join(sys.argv))


def save(data: dict, out: Path) -> None:
    """Targets, JSON, Markdown page and chart of a finished (or resumed and completed) run."""
    data["targets_text"] = targets_text(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_layer.json").write_text(json.dumps(data, indent=1))
    write_report(data, out)
    print("\n".join(data["targets_text"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--profile", default="full", choices=["full", "smoke"])
    ap.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    ap.add_argument("--impls", default="auto,triton,hybrid,gmm,loop,hf,einsum,moeops,sonic",
                    help="comma list of: " + ",".join(k for k, *_ in IMPLS))
    ap.add_argument("--fwd-only", default="", help="comma list of impl keys timed forward only")
    ap.add_argument("--fwd-only-reason", default="its backward failed on this GPU")
    ap.add_argument("--resume", default="", help="json of an earlier run: keep its results, run only what is missing")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new cases after this many seconds")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--iters-small", type=int, default=20)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--report", default="", help="only re-render md/png from this json")
    ap.add_argument("--dispatch-only", action="store_true",
                    help="with --resume: re-time only the capacity dispatch + combine of its cases")
    ap.add_argument("--dense-only", action="store_true",
                    help="with --resume: time only the dense-MLP reference of its cases (in a fresh process)")
    ap.add_argument("--experts-graph", action="store_true",
                    help="also time each dispatcher alone as a CUDA graph replay (in the same process as the layers: "
                         "on the H100 a capture there once failed and left the CUDA RNG unusable; use with --only)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        data = json.loads(Path(args.report).read_text())
        for r in data["results"]:
            r["summary"] = summarize(r)
        data["targets_text"] = targets_text(data)
        write_report(data, Path(args.report).parent)
        return
    t0 = time.time()
    args.deadline = t0 + args.budget_s
    torch.backends.cuda.matmul.allow_tf32 = True
    # On CUDA the layers compile their routing bookkeeping (MoEConfig.compile_routing). A real model recompiles it
    # for a few shapes; this grid has ~30, past dynamo's default limit of 8, after which the layer would fall back
    # to eager for the rest of the run. Compilation happens in the untimed warm-up.
    torch._dynamo.config.recompile_limit = 256
    cases = build_grid(args.profile)
    if args.only:
        keys = args.only.split(",")
        cases = [c for c in cases if any(k in c["name"] for k in keys)]
    data = dict(env=env_info(), peer_status=peer_status(), results=[], trimmed=[], runs=[])
    done = {}
    if args.resume and Path(args.resume).exists():
        old = json.loads(Path(args.resume).read_text())
        data["runs"] = old.get("runs", [])
        for k in ("peer_status",):
            for n, v in old.get(k, {}).items():
                if data[k].get(n) is not True:
                    data[k][n] = v
        done = {r["name"]: r for r in old["results"]}
        data["results"] = list(old["results"])
    data["dense_tflops"] = dense_rate()
    data["runs"].append(dict(env=data["env"], dense_tflops=data["dense_tflops"]))
    print(json.dumps(data["env"]), "dense", data["dense_tflops"], data["peer_status"], flush=True)
    if args.dense_only:
        for case in cases:
            if case["name"] in done and time.time() < args.deadline:
                time_dense_mlp(case, done[case["name"]], args)
                done[case["name"]]["summary"] = summarize(done[case["name"]])
        return save(data, out)
    if args.dispatch_only:
        for case in cases:
            if case["cf"] is None or case["name"] not in done or time.time() > args.deadline:
                continue
            layer = make_layer(case)
            flat = [routing_flat(layer, x) for x in input_pool(case, layer, args.pool)]
            n_iter = args.iters if flops(case, case["B"] * case["S"])[1] > 2e12 else args.iters_small
            done[case["name"]]["dispatch"] = time_dispatch_combine(case, layer, flat, args.warm, n_iter)
            print(case["name"], done[case["name"]]["dispatch"], flush=True)
            del layer, flat
            torch.cuda.empty_cache()
        return save(data, out)
    all_keys = [k for k in args.impls.split(",") if k]
    for case in cases:
        prev = done.get(case["name"])
        todo = [k for k, n, *_ in IMPLS if k in all_keys and (prev is None or n not in prev["impls"]
                                                                 or prev["impls"][n].get("skipped") == "time")]
        if not todo:
            continue
        if time.time() > args.deadline - 20:
            if prev is None:
                data["trimmed"].append(case["name"])
            continue
        print(f"== {case['name']}  ({time.time() - t0:.0f}s) {todo}", flush=True)
        args.impls_run = ",".join(todo)
        try:
            a2 = argparse.Namespace(**{**vars(args), "impls": args.impls_run})
            rec = run_case(case, data["peer_status"], data["dense_tflops"], a2)
        except Exception as ex:
            traceback.print_exc()
            rec = dict(case, T=case["B"] * case["S"], tokens_per_expert=0, impls={}, error=str(ex)[:300])
        if prev is not None:
            prev["impls"].update(rec["impls"])
            rec = prev
        else:
            data["results"].append(rec)
        rec["summary"] = summarize(rec)
        data["trimmed"] = [n for n in data["trimmed"] if n not in {r["name"] for r in data["results"]}]
        data["targets_text"] = targets_text(data)
        out.mkdir(parents=True, exist_ok=True)
        (out / "moe_layer.json").write_text(json.dumps(data, indent=1))
        torch.cuda.empty_cache()
    names = {r["name"] for r in data["results"]}
    data["trimmed"] = [c["name"] for c in build_grid(args.profile) if c["name"] not in names]
    data["wall_s"] = time.time() - t0
    save(data, out)


if __name__ == "__main__":
    main()
