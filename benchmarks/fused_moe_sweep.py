#!/usr/bin/env python
"""Tile-configuration sweep of the fused MoE Triton kernels (one kernel at a time), plus whole
fused_moe forward / forward+backward timings for each expert-GEMM backend.

    python benchmarks/fused_moe_sweep.py --out DIR [--compile-only --worker i/n]
    python benchmarks/fused_moe_sweep.py --kinds "" --out DIR   # backends only -> fused_moe_backends.{json,md}

The backend timings are taken launched eagerly (host launch cost included) and as CUDA graph replays (GPU time:
how the MoE layer runs fused_moe in training, MoEConfig.cuda_graphs); ``zoo.kernels.fused_moe.auto_backend`` is
fitted on the latter.

Used to choose the fixed per-shape configurations in ``zoo/kernels/fused_moe.py::_pick_config``
(configs are fixed by shape, never autotuned at run time, so results stay bitwise reproducible).
``--compile-only`` launches every (kernel, config) once so Triton's on-disk cache is warm; several
such workers can run in parallel before the (serial) timing pass.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

fm = importlib.import_module("zoo.kernels.fused_moe")
GemmConfig = fm.GemmConfig

SHAPES = {
    "vmoe_B_E8k2": dict(T=12608, D=768, H=3072, E=8, K=2, act="gelu_tanh", bias=True),
    "vmoe_B_E8k2_T4728": dict(T=4728, D=768, H=3072, E=8, K=2, act="gelu_tanh", bias=True),
    "vmoe_B_E8k1": dict(T=12608, D=768, H=3072, E=8, K=1, act="gelu_tanh", bias=True),
    "vmoe_B_E32k2": dict(T=12608, D=768, H=3072, E=32, K=2, act="gelu_tanh", bias=True),
    "vmoe_B_E8k2_T31520": dict(T=31520, D=768, H=3072, E=8, K=2, act="gelu_tanh", bias=True),
    "vmoe_L_E8k2": dict(T=12608, D=1024, H=4096, E=8, K=2, act="gelu_tanh", bias=True),
    "vmoe_L_E32k2": dict(T=12608, D=1024, H=4096, E=32, K=2, act="gelu_tanh", bias=True),
    "vmoe_B_E8k2_T25k": dict(T=25216, D=768, H=3072, E=8, K=2, act="gelu_tanh", bias=True),  # train_step.py batch
    "vmoe_B_E32k1": dict(T=12608, D=768, H=3072, E=32, K=1, act="gelu_tanh", bias=True),
    "vmoe_S_E8k2": dict(T=12608, D=384, H=1536, E=8, K=2, act="gelu_tanh", bias=True),
    "mixtral_T8k": dict(T=8192, D=4096, H=14336, E=8, K=2, act="swiglu", bias=False),
    "mixtral_T4k": dict(T=4096, D=4096, H=14336, E=8, K=2, act="swiglu", bias=False),
    "olmoe_T16k": dict(T=16384, D=2048, H=1024, E=64, K=8, act="swiglu", bias=False),
    "olmoe_T4k": dict(T=4096, D=2048, H=1024, E=64, K=8, act="swiglu", bias=False),
    "finegrained_T16k": dict(T=16384, D=1536, H=256, E=128, K=8, act="swiglu", bias=False),
    "finegrained_T4k": dict(T=4096, D=1536, H=256, E=128, K=8, act="swiglu", bias=False),
}
GEMM_CFGS = [GemmConfig(128, 128, 64, 4, 3), GemmConfig(128, 128, 64, 8, 3), GemmConfig(128, 256, 64, 8, 3),
             GemmConfig(128, 128, 64, 4, 4), GemmConfig(64, 128, 64, 4, 4), GemmConfig(128, 64, 64, 4, 4),
             GemmConfig(256, 128, 64, 8, 3)]
WGRAD_CFGS = [GemmConfig(128, 128, 64, 8, 3), GemmConfig(128, 128, 64, 4, 3), GemmConfig(128, 256, 64, 8, 3)]
KINDS = ["gemm1", "gemm2", "bwd_act", "dx", "dw1", "dw2", "dw1_pre", "dw2_pre"]


def setup(sh: dict):
    g = torch.Generator(device="cuda").manual_seed(0)
    T, D, H, E, K = sh["T"], sh["D"], sh["H"], sh["E"], sh["K"]
    swiglu = sh["act"] == "swiglu"
    H2 = 2 * H if swiglu else H
    dt = torch.bfloat16
    x = torch.randn(T, D, device="cuda", dtype=dt, generator=g)
    w1 = (torch.randn(E, D, H2, device="cuda", generator=g) * D ** -0.5).to(dt)
    w2 = (torch.randn(E, H, D, device="cuda", generator=g) * H ** -0.5).to(dt)
    b1 = torch.randn(E, H2, device="cuda", dtype=dt, generator=g) * 0.1 if sh["bias"] else None
    b2 = torch.randn(E, D, device="cuda", dtype=dt, generator=g) * 0.1 if sh["bias"] else None
    logits = torch.randn(T, E, device="cuda", generator=g)
    cw, ei = torch.softmax(logits, -1).topk(K, -1)
    keep = torch.ones_like(ei, dtype=torch.bool)
    meta = fm.route(ei, keep, E)
    cw32 = cw.reshape(-1).float().contiguous()
    TK = T * K
    st = dict(x=x, w1=w1, w2=w2, b1=b1, b2=b2, ei=ei, cw=cw, keep=keep, meta=meta, cw32=cw32,
              swiglu=swiglu, H=H, H2=H2, D=D, K=K, TK=TK)
    st["hpre"], st["act"] = fm._launch_gemm1(x, w1, b1, meta, K, H, swiglu, True)
    st["dy"] = torch.randn(T, D, device="cuda", dtype=dt, generator=g)
    st["dh"] = torch.empty(TK, H2, device="cuda", dtype=dt)
    st["yslot"] = torch.empty(TK, D, device="cuda", dtype=dt)
    st["xs"], _ = fm._gather_rows(x, meta, meta.e_row, K)
    _, st["d_o"] = fm._gather_rows(st["dy"], meta, meta.e_row, K, cw32, unscaled=False, scaled=True)
    st["dw1"] = torch.empty_like(w1)
    st["dw2"] = torch.empty_like(w2)
    st["db1"] = torch.empty_like(b1) if b1 is not None else None
    st["db2"] = torch.empty_like(b2) if b2 is not None else None
    return st


def launcher(kind: str, s: dict):
    m = s["meta"]
    if kind == "gemm1":
        return lambda: fm._launch_gemm1(s["x"], s["w1"], s["b1"], m, s["K"], s["H"], s["swiglu"], True), \
            2 * s["TK"] * s["D"] * s["H2"]
    if kind == "gemm2":
        return lambda: fm._launch_gemm_scatter("gemm2", s["act"], s["w2"], s["b2"], s["cw32"], m, s["D"], s["H"],
                                               s["w2"].stride(1), s["w2"].stride(2), s["yslot"]), 2 * s["TK"] * s["H"] * s["D"]
    if kind == "bwd_act":
        return lambda: fm._launch_bwd_act(s["dy"], s["w2"], s["b2"], s["act"], s["hpre"], s["cw32"], m, s["K"],
                                          s["swiglu"], s["dh"]), 2 * s["TK"] * s["D"] * s["H"]
    if kind == "dx":
        return lambda: fm._launch_gemm_scatter("dx", s["dh"], s["w1"], None, None, m, s["D"], s["H2"], s["w1"].stride(2),
                                               s["w1"].stride(1), s["yslot"]), 2 * s["TK"] * s["H2"] * s["D"]
    if kind == "dw1":
        return lambda: fm._launch_wgrad("dw1", s["x"], s["dh"], None, m, s["K"], s["D"], s["H2"], s["dw1"], s["db1"],
                                        True, False, False), 2 * s["TK"] * s["D"] * s["H2"]
    if kind == "dw2":
        return lambda: fm._launch_wgrad("dw2", s["act"], s["dy"], s["cw32"], m, s["K"], s["H"], s["D"], s["dw2"],
                                        s["db2"], False, True, True), 2 * s["TK"] * s["H"] * s["D"]
    if kind == "dw1_pre":  # operands first gathered in sorted order (WGRAD_PREGATHER)
        return lambda: fm._launch_wgrad("dw1", s["xs"], s["dh"], None, m, s["K"], s["D"], s["H2"], s["dw1"], s["db1"],
                                        False, False, False), 2 * s["TK"] * s["D"] * s["H2"]
    if kind == "dw2_pre":
        return lambda: fm._launch_wgrad("dw2", s["act"], s["d_o"], None, m, s["K"], s["H"], s["D"], s["dw2"],
                                        s["db2"], False, False, False), 2 * s["TK"] * s["H"] * s["D"]
    raise KeyError(kind)


def cfgs_for(kind: str, s: dict):
    if kind in ("dw1", "dw2", "dw1_pre", "dw2_pre"):
        return WGRAD_CFGS
    if kind == "gemm1" and s["swiglu"]:
        return [c for c in GEMM_CFGS if c.BN <= 128 and c.BM <= 128]
    return GEMM_CFGS


def time_backend(s: dict, sh: dict, backend: str) -> dict:
    """Whole fused_moe with the current heuristics on one backend: forward without autograd and forward+backward with
    every gradient, launched eagerly (triton.testing.do_bench) and as CUDA graph replays (moe_layer.graph_replay_ms)."""
    import triton
    from moe_layer import graph_replay_ms

    ps = [s["x"].clone().requires_grad_(True), s["cw"].clone().requires_grad_(True),
          s["w1"].clone().requires_grad_(True), s["w2"].clone().requires_grad_(True)]

    def fwd(*_):
        return fm.fused_moe(ps[0], s["ei"], ps[1], s["keep"], ps[2], s["b1"], ps[3], s["b2"], sh["act"],
                            backend=backend)

    def fb(*_):
        for p in ps:
            p.grad = None
        fwd().backward(s["dy"])

    fl = (6 if s["swiglu"] else 4) * s["TK"] * s["D"] * s["H"]
    try:
        with torch.no_grad():
            r = dict(fwd_nograd_ms=triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median"),
                     fwd_nograd_graph_ms=graph_replay_ms(fwd, (), 3, 20))
        r["fwdbwd_ms"] = triton.testing.do_bench(fb, warmup=25, rep=150, return_mode="median")
        r["fwdbwd_graph_ms"] = graph_replay_ms(fb, (), 3, 20)
        r["fwdbwd_graph_tflops"] = 3 * fl / r["fwdbwd_graph_ms"] / 1e9
        return r
    except Exception as ex:
        return dict(error=f"{type(ex).__name__}: {str(ex)[:300]}")


def write_backends_report(res: dict, out: Path) -> None:
    e = res["env"]
    shapes = list(dict.fromkeys(k.split("|")[0] for k in res["whole"]))
    backends = list(dict.fromkeys(k.split("|")[1] for k in res["whole"]))
    lines = ["# fused_moe expert-GEMM backends: whole forward+backward", "",
             f"{e['device']}, torch {e['torch']}, triton {e['triton']}, {e['date']}; `{e['command']}`.", "",
             "bf16, uniform random top-k routing, every slot kept; all gradients (x, combine weights, w1, w2, biases "
             "where the shape has them). CUDA graph: fused_moe captured once and replayed (GPU time; how the MoE "
             "layer runs it in training). Eager: launched from Python each call (host launch cost included). "
             "Backends: triton (gather-fused Triton kernels, forward and backward), hybrid (Triton forward, "
             "torch._grouped_mm backward), grouped_mm (torch._grouped_mm forward and backward). auto = the pick of "
             "`zoo.kernels.fused_moe.auto_backend` for the shape.", "",
             "| shape | auto | " + " | ".join(f"{b} graph ms" for b in backends) + " | "
             + " | ".join(f"{b} eager ms" for b in backends) + " | fastest (graph) |",
             "|---|---|" + "---|" * (2 * len(backends) + 1)]
    for sh_name in shapes:
        sh = SHAPES[sh_name]
        auto = fm.auto_backend(sh["T"], sh["K"], sh["E"], sh["D"], sh["H"], sh["act"], True)
        rows = {b: res["whole"].get(f"{sh_name}|{b}", {}) for b in backends}
        g = {b: r["fwdbwd_graph_ms"] for b, r in rows.items() if "fwdbwd_graph_ms" in r}
        lines.append(f"| {sh_name} (T={sh['T']} D={sh['D']} H={sh['H']} E={sh['E']} k={sh['K']} {sh['act']}) | {auto} | "
                     + " | ".join(f"{rows[b]['fwdbwd_graph_ms']:.3f}" if b in g else "-" for b in backends) + " | "
                     + " | ".join(f"{rows[b]['fwdbwd_ms']:.3f}" if "fwdbwd_ms" in rows[b] else "-" for b in backends)
                     + f" | {min(g, key=g.get) if g else '-'} |")
    (out / "fused_moe_backends.md").write_text("\n".join(lines) + "\n")


def main():
    import triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--worker", default="0/1")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--no-whole", action="store_true")
    ap.add_argument("--backends", default="triton,hybrid,grouped_mm",
                    help="fused_moe backends timed whole")
    args = ap.parse_args()
    wi, wn = (int(v) for v in args.worker.split("/"))
    res = {"kernels": {}, "whole": {}}
    job = 0
    t0 = time.time()
    for sname in args.shapes.split(","):
        sh = SHAPES[sname]
        s = setup(sh)
        for kind in [k for k in args.kinds.split(",") if k]:  # --kinds "" times only the whole fused_moe
            for cfg in cfgs_for(kind, s):
                job += 1
                if args.compile_only and job % wn != wi:
                    continue
                fm.CONFIG_OVERRIDE.clear()
                fm.CONFIG_OVERRIDE[kind.replace("_pre", "")] = cfg
                fn, fl = launcher(kind, s)
                key = f"{sname}|{kind}|{cfg.BM}x{cfg.BN}x{cfg.BK}w{cfg.num_warps}s{cfg.num_stages}"
                try:
                    fn()
                    torch.cuda.synchronize()
                    if not args.compile_only:
                        ms = triton.testing.do_bench(fn, warmup=25, rep=80, return_mode="median")
                        res["kernels"][key] = dict(ms=ms, tflops=fl / ms / 1e9)
                        print(f"{key:60s} {ms:8.3f} ms {fl / ms / 1e9:7.1f} TFLOP/s", flush=True)
                except Exception as ex:
                    res["kernels"][key] = dict(error=f"{type(ex).__name__}: {str(ex)[:200]}")
                    print(key, "ERROR", str(ex)[:200], flush=True)
        fm.CONFIG_OVERRIDE.clear()
        if not args.compile_only and not args.no_whole:
            for backend in args.backends.split(","):
                res["whole"][f"{sname}|{backend}"] = time_backend(s, sh, backend)
                print(sname, backend, json.dumps(res["whole"][f"{sname}|{backend}"]), flush=True)
        s = None
        torch.cuda.empty_cache()
    if not args.compile_only:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        if res["kernels"]:
            (Path(args.out) / "fused_moe_sweep.json").write_text(json.dumps(res, indent=1))
        else:  # backends only
            from moe_layer import env_info

            res["env"] = env_info()
            (Path(args.out) / "fused_moe_backends.json").write_text(json.dumps(res, indent=1))
            write_backends_report(res, Path(args.out))
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
