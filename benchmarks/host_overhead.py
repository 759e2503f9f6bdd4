#!/usr/bin/env python
"""Host (CPU) cost of the MoE layer on the GPU: how long Python takes to issue the work, part by part.

    python benchmarks/host_overhead.py --out benchmarks/results      # writes host_overhead.{json,md}

Why: the eager V-MoE training step and the small V-MoE layer cases are launch-bound (``train_step.md``: GPU busy
75.5 of 81.0 ms): the GPU waits for the host. This measures, for each part of the layer, the host time per call
(``issue``: the loop of calls without synchronisation, divided by the count, at a token count so small that the GPU
keeps up) and the GPU time at the V-MoE-B/16 size (``gpu``: CUDA events), so the parts whose host time exceeds their
GPU time show up. It also times one launch of a tiny PyTorch op and of a tiny Triton kernel (through Triton's
``JITFunction`` and through the compiled kernel's launcher directly), and writes a CPU profile of one layer
forward+backward (``host_overhead_profile.txt``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from moe_layer import cuda_time, env_info  # noqa: E402


def host_us(fn, n: int = 40, warm: int = 20, repeats: int = 7) -> float:
    """Microseconds per call of issuing fn() n times back to back (one synchronisation at the end); the median of
    ``repeats`` such loops (single loops vary by tens of percent with the host's state)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    loops = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        loops.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(loops)


def gpu_us(fn, n: int = 30, warm: int = 5) -> float:
    """Median CUDA-event microseconds per call (:func:`moe_layer.cuda_time`)."""
    return cuda_time(lambda i: fn(), warm, n) * 1e3


def launch_costs() -> dict:
    """One launch of a tiny torch op and a tiny Triton kernel (us of host time)."""
    from zoo.kernels.fused_moe import _combine_kernel

    out = {}
    a = torch.zeros(1, device="cuda")
    out["torch_add_"] = host_us(lambda: a.add_(1.0), n=500)
    src = torch.zeros(8, 64, device="cuda", dtype=torch.bfloat16)
    valid = torch.ones(8, dtype=torch.uint8, device="cuda")
    dst = torch.empty(8, 64, device="cuda", dtype=torch.bfloat16)
    args = (src, valid, valid, src, valid, src, dst, 8, 64, 64, 0, 64)
    kw = dict(K_TOP=1, HAS_IDX=False, HAS_W=False, HAS_BIAS=False, BT=8, BD=64)
    out["triton_jit_launch"] = host_us(lambda: _combine_kernel[(1, 1)](*args, **kw), n=500)
    try:
        compiled = _combine_kernel[(1, 1)](*args, **kw)
        params = [p.name for p in _combine_kernel.params]
        full = list(args) + [kw[p] for p in params[len(args):]]
        runner = compiled[(1, 1, 1)]
        runner(*full)
        torch.cuda.synchronize()
        out["triton_compiled_runner"] = host_us(lambda: runner(*full), n=500)
    except Exception as ex:  # the direct-launch API differs between Triton versions
        out["triton_compiled_runner_error"] = repr(ex)[:300]
    return out


def layer_parts(T_images: int, compile_routing, cuda_graphs, profile_path: Path | None) -> dict:
    """Host and GPU time (us) of each part of a V-MoE-B/16 E8 k2 cf1.05 layer, bf16, training mode. The router parts
    are the routing graph as a dispatcher outside it gets it (losses and statistics, not the experts); the layer
    parts include the experts (on the fused path inside that graph)."""
    from zoo.moe import MoEConfig, MoELayer
    from zoo.moe.layer import routed_moe
    from zoo.moe.compiled import maybe_compiled
    from zoo.kernels import fused_moe

    cfg = MoEConfig(num_experts=8, top_k=2, router="topk", noise_std=1.0, batch_priority=True, capacity_factor=1.05,
                    group_size=8, activation="gelu_tanh", expert_bias=True, dispatch="fused",
                    compile_routing=compile_routing, cuda_graphs=cuda_graphs)
    torch.manual_seed(0)
    layer = MoELayer(768, 3072, cfg).cuda().to(torch.bfloat16).train()
    x = torch.randn(T_images, 197, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    (xg, vg, mg), _ = layer._group(x, torch.ones(x.shape[:2], dtype=torch.bool, device="cuda"), None)
    D = xg.shape[-1]
    router = layer.router

    def f_router():  # decision + losses + statistics, as the layer runs them for a dispatcher outside the graph
        plan = router.plan(xg, vg, 2, 1.05, all_valid=True)
        step = maybe_compiled(routed_moe, cfg.compile_routing, xg.device, cfg.cuda_graphs)
        combine_weight, aux, routing = step(plan.decide, plan.args, cfg, xg.reshape(-1, D), vg, None, True, None,
                                            None, cfg.activation)
        return combine_weight, aux, routing

    def f_router_fwd():  # forward only: a new step for the CUDA graphs each call (MoEConfig.cuda_graphs)
        torch.compiler.cudagraph_mark_step_begin()
        return f_router()

    r = f_router()[2]  # copies: a CUDA graph's outputs are reused by its next step
    flat = (xg.reshape(-1, D).detach().requires_grad_(True), r.expert_index.reshape(-1, 2).clone(),
            r.combine_weight.reshape(-1, 2).to(xg.dtype).clone().requires_grad_(True), r.keep.reshape(-1, 2).clone())
    e = layer.experts
    dflat = torch.randn_like(flat[0])

    def f_fused_fwd():
        return fused_moe(*flat, e.w1, e.b1, e.w2, e.b2, "gelu_tanh")

    def f_fused_fwdbwd():
        y = fused_moe(*flat, e.w1, e.b1, e.w2, e.b2, "gelu_tanh")
        y.backward(dflat)

    def f_layer_fwd():
        torch.compiler.cudagraph_mark_step_begin()
        return layer(x)

    fm = importlib.import_module("zoo.kernels.fused_moe")

    def f_custom_op_fwdbwd():  # the custom op that torch.compile takes, called eagerly: what its dispatch costs
        y = fm.fused_moe_forward(flat[0], flat[2], e.w1, e.b1, e.w2, e.b2, flat[1], flat[3], False, "triton", True)[0]
        y.backward(dflat)

    # Every timed call is a step of its own for the CUDA graphs (torch.compiler.cudagraph_mark_step_begin): once a
    # process has called it, CUDA graph trees count steps only by it.
    def f_layer_fwdbwd():
        torch.compiler.cudagraph_mark_step_begin()
        x.grad = None  # a CUDA graph output, overwritten by the next step: not accumulated into
        y = layer(x)
        torch.autograd.backward([y, layer.aux.loss], [dy, torch.ones_like(layer.aux.loss)])

    def f_router_fwdbwd():
        torch.compiler.cudagraph_mark_step_begin()
        x.grad = None
        combine_weight, aux, _ = f_router()
        (combine_weight.float().sum() + aux.loss).backward()

    parts = dict(router_aux_fwd=f_router_fwd, router_aux_fwdbwd=f_router_fwdbwd,
                 fused_moe_fwd=f_fused_fwd, fused_moe_fwdbwd=f_fused_fwdbwd,
                 fused_moe_fwdbwd_as_custom_op=f_custom_op_fwdbwd, layer_fwd=f_layer_fwd,
                 layer_fwdbwd=f_layer_fwdbwd)
    res = {}
    for name, fn in parts.items():
        res[name] = dict(host_us=host_us(fn), gpu_us=gpu_us(fn))
        print(T_images, compile_routing, cuda_graphs, name, res[name], flush=True)
    if profile_path is not None:
        from torch.profiler import ProfilerActivity, profile

        for _ in range(3):
            f_layer_fwdbwd()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                f_layer_fwdbwd()
            torch.cuda.synchronize()
        avg = prof.key_averages()
        profile_path.write_text(avg.table(sort_by="self_cpu_time_total", row_limit=60) + "\n\n"
                                + avg.table(sort_by="cpu_time_total", row_limit=40))
    return res


def write_report(data: dict, out: Path) -> None:
    env = data["env"]
    lines = ["# MoE layer host overhead", "",
             f"- {env['device']}, torch {env['torch']}, triton {env['triton']}, python {env['python']}; {env['date']}; "
             f"`{env['command']}`",
             "- host = Python issuing the call, us per call (calls back to back, one sync at the end, at a token count "
             "where the GPU keeps up); gpu = CUDA-event time per call (us). A part whose host time at full size exceeds "
             "its GPU time leaves the GPU idle in eager training.", "",
             "## One launch (host us)", "", "| launch | us |", "|---|---|"]
    for k, v in data["launch"].items():
        lines.append(f"| {k} | {v if isinstance(v, str) else f'{v:.1f}'} |")
    for label, res in data["parts"].items():
        lines += ["", f"## {label}", "", "| part | host us | gpu us |", "|---|---|---|"]
        for name, v in res.items():
            lines.append(f"| {name} | {v['host_us']:.0f} | {v['gpu_us']:.0f} |")
    (out / "host_overhead.md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.recompile_limit = 64
    data = dict(env=env_info(), launch=launch_costs(), parts={})
    print(data["launch"], flush=True)
    for images, comp, graphs, label in (
            (8, None, None, "8 images (T=1576), compiled, CUDA graphs (the default)"),
            (64, None, None, "64 images (T=12608), compiled, CUDA graphs (the default)"),
            (8, None, False, "8 images (T=1576), compiled, no CUDA graphs"),
            (64, None, False, "64 images (T=12608), compiled, no CUDA graphs"),
            (8, False, False, "8 images (T=1576), eager"),
            (64, False, False, "64 images (T=12608), eager")):
        prof = out / "host_overhead_profile.txt" if (images == 64 and comp is None and graphs is None) else None
        data["parts"][label] = layer_parts(images, comp, graphs, prof)
        (out / "host_overhead.json").write_text(json.dumps(data, indent=1))
    write_report(data, out)
    print((out / "host_overhead.md").read_text())


if __name__ == "__main__":
    main()
