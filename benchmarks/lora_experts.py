#!/usr/bin/env python
"""LoRA experts (Uni-MoE) on the GPU: merge the factors every step, merge once, or a low-rank path. One GPU run.

    python benchmarks/lora_experts.py --out benchmarks/results --budget-s 95   # writes lora_experts.{json,md}
    python benchmarks/lora_experts.py --smoke --out /tmp/lora                   # tiny shapes, CPU, seconds

Experts: ``zoo.moe.LoRAExperts`` at LLaMA-7B FFN size (D 4096, F 11008, SwiGLU, r 8, alpha 16, bf16), top-2
routing (softmax over the two raw top logits, dropless, as Uni-MoE routes):
  * ``v1``: Uni-MoE v1 stage 3, 4 experts, one frozen FFN PER EXPERT (``per_expert_base=True``);
  * ``v2``: 8 LoRA experts around ONE shared frozen FFN (``per_expert_base=False``).
The routing (random router weights, a pool of inputs, so every iteration routes differently) is computed once and
shared by every path; what is timed is the experts alone (the dispatcher level of ``benchmarks/moe_layer.py``).

Paths (each on the same inputs):
  (a) ``merge_each_step``: ``experts.stacked()`` (base + s A B per expert, differentiable) then ``fused_moe``:
      what ``MoELayer`` runs today, every forward (training: the factors change every step).
  (b) ``merged_once``: ``experts.merged()`` once, then ``fused_moe`` on its weights: the inference ceiling. Its
      forward+backward row is the same frozen weights with the input gradient only (no LoRA gradients at all): a
      lower bound for a training step, not a training step.
  (c) ``lowrank``: the frozen base GEMMs plus the per-expert low-rank products on the routed tokens, never
      materialising per-expert weights: the library's :func:`zoo.moe.lowrank.lowrank_moe`, which ``LoRAExperts``
      runs in a training step (``LoRAExperts.routed_path``). NOT the fused Triton kernel plus a delta: the kernel
      applies SwiGLU between its two GEMMs, and the gate/up delta enters before that activation and the down delta
      after it, so a delta cannot be added to the kernel's output. The base GEMMs are grouped
      (``torch._grouped_mm``, the CUTLASS grouped GEMM of the fused path's grouped_mm backend; a per-expert loop
      where that is unavailable) for a per-expert base, and plain dense GEMMs over the tokens for a shared base
      (its up/gate GEMM then runs once per TOKEN instead of once per routed slot: half the rows at top-2). The
      low-rank products of all E experts are one dense GEMM with the concatenated factors, each row masked to its
      expert's block (E*r columns: 64-128).
  (ref) ``reference``: the zoo's plain-PyTorch dispatcher (``zoo.moe.dispatch.sorted_dispatch``, calling
      ``LoRAExperts.expert``): what the layer runs where the fused kernel cannot.
Forward = inference (``torch.no_grad``); forward+backward = a training step of the layer: gradients to the LoRA
factors AND the input (the layers below need it), base frozen. Median of CUDA-event times after warm-up; peak
memory = max allocated during one call minus what was allocated before it (so (b)'s resident merged copy is not in
it: it is reported separately).
Correctness: each path's output and gradients (LoRA factors and input) against the fp32 ground truth
(``zoo.moe.dispatch.loop_dispatch`` on an fp32 copy of the experts), max |err| / max |ref|, with a tolerance per
dtype; (c) also against (b)'s output. The LoRA B factors are random (not the zero init) and ``lora_b1`` is random
outside its SwiGLU block structure too, so the deltas matter and a missing mask shows. Exit status 1 when a check
fails.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

FFN = dict(D=4096, F=11008, r=8, alpha=16.0, k=2)  # LLaMA-7B FFN, Uni-MoE's LoRA
VARIANTS = {"v1": dict(E=4, per_expert_base=True), "v2": dict(E=8, per_expert_base=False)}
SMOKE_FFN = dict(D=32, F=48, r=8, alpha=16.0, k=2)
PATHS = {  # key: label
    "merge_each_step": "(a) merge every step + fused",
    "merged_once": "(b) merged once + fused",
    "lowrank": "(c) low-rank path",
    "reference": "(ref) plain PyTorch (sorted_dispatch)",
}
TOL = {torch.bfloat16: (3e-2, 6e-2), torch.float32: (2e-3, 5e-3)}  # (output, gradients), max|err| / max|ref|


# ----------------------------------------------------------------------------------------- the paths
# (c) is the library's own low-rank path (what LoRAExperts runs in a training step): measured here, not copied.
from zoo.moe.lowrank import lowrank_moe  # noqa: E402


def make_paths(ex, merged, grouped_mm_ok: bool) -> dict:
    """Path key -> fn(x, expert_index, combine_weight, keep) -> y."""
    from zoo.kernels import fused_moe
    from zoo.moe.dispatch import sorted_dispatch

    def merge_each_step(x, ei, cw, keep):
        sw = ex.stacked()
        return fused_moe(x, ei, cw, keep, sw.w1, sw.b1, sw.w2, sw.b2, sw.activation)

    def merged_once(x, ei, cw, keep):
        return fused_moe(x, ei, cw, keep, merged.w1, merged.b1, merged.w2, merged.b2, merged.activation)

    return {"merge_each_step": merge_each_step, "merged_once": merged_once,
            "lowrank": lambda x, ei, cw, keep: lowrank_moe(ex, x, ei, cw, keep, grouped_mm=grouped_mm_ok),
            "reference": lambda x, ei, cw, keep: sorted_dispatch(x, ei, cw, keep, ex)}


# ----------------------------------------------------------------------------------------- set-up
def build_experts(c: dict, device, dtype, seed: int = 0):
    """LoRA experts with unit-scale activations and random (not zero) B factors, so the deltas are a visible part
    of every output; ``lora_b1`` is random outside its SwiGLU block mask as well (the mask must be applied)."""
    from zoo.moe import LoRAExperts

    torch.manual_seed(seed)
    with torch.device(device):
        ex = LoRAExperts(c["E"], c["D"], c["F"], "swiglu", bias=False, r=c["r"], alpha=c["alpha"],
                         per_expert_base=c["per_expert_base"])
        with torch.no_grad():
            ex.w1.normal_(0, c["D"] ** -0.5)
            ex.w2.normal_(0, c["F"] ** -0.5)
            ex.lora_b1.normal_(0, 0.05)
            ex.lora_b2.normal_(0, 0.05)
    return ex.to(dtype)


def make_inputs(c: dict, T: int, n: int, device, dtype, seed: int = 1) -> list:
    """n inputs (x [T, D], expert_index, combine_weight, keep [T, k], dy [T, D]): top-k of random router logits,
    softmax over the k (Mixtral / Uni-MoE), dropless."""
    g = torch.Generator(device=device).manual_seed(seed)
    router = torch.randn(c["D"], c["E"], device=device, generator=g) * c["D"] ** -0.5
    out = []
    for _ in range(n):
        x = torch.randn(T, c["D"], device=device, generator=g)
        top, ei = torch.topk(x @ router, c["k"], dim=-1)
        cw = torch.softmax(top, dim=-1)
        keep = torch.ones_like(ei, dtype=torch.bool)
        dy = torch.randn(T, c["D"], device=device, generator=g)
        out.append((x.to(dtype), ei, cw.to(dtype), keep, dy.to(dtype)))
    return out


# ----------------------------------------------------------------------------------------- correctness
def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def reference_outputs(ex, inp) -> dict:
    """fp32 ground truth: loop_dispatch on an fp32 copy of the experts; output and gradients."""
    from zoo.moe.dispatch import loop_dispatch

    x, ei, cw, keep, dy = inp
    ex32 = copy.deepcopy(ex).float()
    x32 = x.detach().float().requires_grad_(True)
    y = loop_dispatch(x32, ei, cw.float(), keep, ex32)
    y.backward(dy.float())
    return {"y": y.detach(), "x": x32.grad, **{n: p.grad for n, p in zip(LORA_NAMES, ex32.lora_parameters())}}


LORA_NAMES = ("lora_a1", "lora_b1", "lora_a2", "lora_b2")


def check_paths(ex, paths: dict, inp, ref: dict, dtype) -> dict:
    """Each path's output and gradients against the fp32 reference ``ref``; (c) also against (b)'s output.
    Returns key -> dict(y_err, grad_err, grad_errs, y_tol, grad_tol, ok[, err_vs_merged])."""
    x, ei, cw, keep, dy = inp
    y_tol, g_tol = TOL.get(dtype, TOL[torch.bfloat16])
    out, ys = {}, {}
    for key, fn in paths.items():
        for p in ex.lora_parameters():
            p.grad = None
        xg = x.detach().clone().requires_grad_(True)
        try:
            y = fn(xg, ei, cw, keep)
            ys[key] = y.detach()
            r = dict(y_err=_rel(y, ref["y"]), y_tol=y_tol, grad_tol=g_tol, finite=bool(torch.isfinite(y).all()))
            y.backward(dy)
        except Exception as err:  # noqa: BLE001 - a path that fails is reported, the others still run
            out[key] = dict(y_err=float("inf"), grad_err=float("inf"), y_tol=y_tol, grad_tol=g_tol, finite=False,
                            grad_errs={}, ok=False, error=f"{type(err).__name__}: {str(err)[:300]}")
            continue
        grads = {"x": xg.grad}
        if key != "merged_once":  # (b): frozen merged weights, the input gradient only
            grads.update({n: p.grad for n, p in zip(LORA_NAMES, ex.lora_parameters())})
        r["grad_errs"] = {n: (_rel(g, ref[n]) if g is not None else float("inf")) for n, g in grads.items()}
        r["grad_err"] = max(r["grad_errs"].values())
        r["ok"] = bool(r["finite"] and r["y_err"] <= y_tol and r["grad_err"] <= g_tol)
        out[key] = r
    for p in ex.lora_parameters():
        p.grad = None
    if "lowrank" in ys and "merged_once" in ys:
        e = _rel(ys["lowrank"], ys["merged_once"])
        out["lowrank"]["err_vs_merged"] = e
        out["lowrank"]["ok"] = bool(out["lowrank"]["ok"] and e <= 2 * y_tol)
    return out


# ----------------------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, n_warm: int, n_iter: int, device) -> float:
    """Median milliseconds of fn(i): CUDA events on a GPU, wall clock on the CPU."""
    for i in range(n_warm):
        fn(i)
    sync(device)
    times = []
    for i in range(n_iter):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(n_warm + i)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn(n_warm + i)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mb(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(0)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def time_path(fn, ex, pool, args, device) -> dict:
    params = ex.lora_parameters()
    xs = [p[0].detach().clone().requires_grad_(True) for p in pool]

    def fwd(i):
        x, ei, cw, keep, _ = pool[i % len(pool)]
        with torch.no_grad():
            fn(x, ei, cw, keep)

    def fwdbwd(i):
        j = i % len(pool)
        _, ei, cw, keep, dy = pool[j]
        for p in params:
            p.grad = None
        xs[j].grad = None
        fn(xs[j], ei, cw, keep).backward(dy)

    def clear():
        for t in (*params, *xs):
            t.grad = None

    r = {"fwd_ms": time_ms(fwd, args.warm, args.iters, device), "fwd_peak_mb": peak_mb(fwd, device)}
    r["fwdbwd_ms"] = time_ms(fwdbwd, args.warm, args.iters, device)
    clear()
    r["fwdbwd_peak_mb"] = peak_mb(fwdbwd, device)
    clear()
    return r


# ----------------------------------------------------------------------------------------- one case
def run_case(c: dict, T: int, args, device, dtype, deadline: float) -> dict:
    from zoo.kernels import fused_moe_available, grouped_mm_available
    from zoo.kernels.fused_moe import choose_backend

    rec = dict(c, T=T, name=f"{c['variant']} E{c['E']} k{c['k']} {'per-expert' if c['per_expert_base'] else 'shared'}"
               f" base T{T}", paths={})
    ex = build_experts(c, device, dtype)
    pool = make_inputs(c, T, args.pool, device, dtype)
    x0 = pool[0][0]
    if not fused_moe_available(x0):
        raise RuntimeError("the fused kernel cannot run here (needs CUDA, or TRITON_INTERPRET=1 on CPU, and triton)")
    gmm = grouped_mm_available(x0)
    rec["lowrank_grouped"] = "torch._grouped_mm" if gmm else "per-expert loop"
    rec["fused_backend"] = choose_backend(x0, T, c["k"], c["E"], c["D"], c["F"], "swiglu")
    sync(device)
    t_merge = time.perf_counter()
    with torch.device(device):  # merged() builds its StackedExperts on the default device: the GPU, not the CPU
        merged = ex.merged().requires_grad_(False)  # (b): merged once, frozen
    sync(device)
    rec["merge_once_ms"] = (time.perf_counter() - t_merge) * 1e3  # once, cold: includes allocation and init
    rec["merged_copy_mb"] = sum(p.numel() * p.element_size() for p in merged.parameters()) / 2 ** 20
    paths = make_paths(ex, merged, gmm)
    ref = reference_outputs(ex, pool[0])
    checks = check_paths(ex, paths, pool[0], ref, dtype)
    if gmm and "error" in checks["lowrank"]:  # keep a (c) number: its per-expert loop instead of torch._grouped_mm
        rec["lowrank_grouped"] = f"per-expert loop (torch._grouped_mm failed: {checks['lowrank']['error']})"
        paths = make_paths(ex, merged, False)
        checks.update(check_paths(ex, {k: paths[k] for k in ("lowrank", "merged_once")}, pool[0], ref, dtype))
    del ref
    for key, fn in paths.items():
        r = dict(label=PATHS[key], **checks[key])
        if "error" not in r and time.time() > deadline:
            r["skipped"] = "time"
        elif "error" not in r:
            try:
                r.update(time_path(fn, ex, pool, args, device))
            except Exception as err:  # noqa: BLE001 - record it and go on with the other paths
                r["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        rec["paths"][key] = r
        print(f"   {key:16s} fwd {_ms(r.get('fwd_ms'))}  fwd+bwd {_ms(r.get('fwdbwd_ms'))}  y_err {r['y_err']:.2e}  "
              f"grad_err {r['grad_err']:.2e}  {'ok' if r['ok'] else 'FAILED'} {r.get('error', '')}",
              flush=True)
    del ex, merged, pool, paths
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def _ms(v) -> str:
    return "-" if v is None else f"{v:8.2f} ms"


# ----------------------------------------------------------------------------------------- report
def conclusion(results: list) -> str:
    """One line from the numbers: the fastest training path and the inference ceiling."""
    def ratios(field, a, b):
        out = []
        for rec in results:
            pa, pb = rec["paths"].get(a, {}), rec["paths"].get(b, {})
            if pa.get(field) and pb.get(field) and pa.get("ok") and pb.get("ok"):
                out.append(pa[field] / pb[field])
        return out

    def span(v):
        return f"{min(v):.2f}x" if min(v) == max(v) or len(v) == 1 else f"{min(v):.2f}-{max(v):.2f}x"

    parts = []
    tr = ratios("fwdbwd_ms", "merge_each_step", "lowrank")  # > 1: low-rank faster
    if tr:
        n, faster = len(tr), sum(1 for v in tr if v > 1)
        if faster == n:
            parts.append(f"training (fwd+bwd): the low-rank path (c) is faster than merging every step (a) in all "
                         f"{n} cases, (a)/(c) time {span(tr)}")
        elif faster == 0:
            parts.append(f"training (fwd+bwd): merging every step (a) is faster than the low-rank path (c) in all "
                         f"{n} cases, (c)/(a) time {span([1 / v for v in tr])}")
        else:
            parts.append(f"training (fwd+bwd): the low-rank path (c) is faster in {faster}/{n} cases, (a)/(c) time "
                         f"{span(tr)}")
    inf_a = ratios("fwd_ms", "merge_each_step", "merged_once")  # > 1: (b) faster
    inf_c = ratios("fwd_ms", "lowrank", "merged_once")
    if inf_a and inf_c:
        parts.append(f"inference (fwd): merged once (b) vs merging every forward (a): (a)/(b) time {span(inf_a)}, "
                     f"vs the low-rank path (c): (c)/(b) time {span(inf_c)}")
    mem = ratios("fwdbwd_peak_mb", "merge_each_step", "lowrank")
    if mem:
        parts.append(f"training peak memory (a)/(c) {span(mem)}")
    bad = [f"{r['name']} {k}" for r in results for k, p in r["paths"].items() if not p.get("ok")]
    if bad:
        parts.append("CORRECTNESS FAILED: " + ", ".join(bad))
    return "; ".join(parts) + "." if parts else "no complete case."


def write_report(data: dict, out: Path) -> None:
    env = data["env"]
    lines = ["# LoRA experts on the fused path: merge every step, merge once, or a low-rank path", "",
             f"- {env['device']}; torch {env['torch']}, triton {env['triton']}, python {env['python']}; {env['date']}; "
             f"dtype {env['dtype']}",
             f"- command: `{env['command']}`",
             f"- LoRAExperts D {data['ffn']['D']}, F {data['ffn']['F']}, SwiGLU, r {data['ffn']['r']}, alpha "
             f"{data['ffn']['alpha']}, top-{data['ffn']['k']} dropless (softmax over the top-k logits); v1 = 4 "
             "experts each with its own frozen FFN, v2 = 8 experts around one shared frozen FFN",
             f"- median of {data['settings']['iters']} iterations after {data['settings']['warm']} warm-up, "
             f"{data['settings']['pool']} routings alternating; forward = `torch.no_grad` inference; forward+backward "
             "= gradients to the LoRA factors and the input, base frozen ((b): input gradient only, frozen merged "
             "weights: a lower bound, not a training step); peak = max allocated during one call above what was "
             "allocated before it",
             "- errors: max |y - y_ref| / max |y_ref| against the fp32 per-expert loop on the same inputs; grad = the "
             "worst of the LoRA factors' and the input's gradients",
             "- (c) is not the fused kernel plus a delta: SwiGLU sits between the kernel's two GEMMs and the gate/up "
             "delta enters before it, so (c) runs the base GEMMs itself (grouped for a per-expert base, dense per "
             "token for a shared base) plus one masked GEMM per low-rank product for all experts", "",
             f"**Conclusion: {data['conclusion']}**", ""]
    for rec in data["results"]:
        lines += [f"## {rec['name']}", "",
                  f"fused backend {rec['fused_backend']}; (c) base GEMMs "
                  f"{rec['lowrank_grouped'] if rec['per_expert_base'] else 'dense (shared base)'}; (b) keeps a merged "
                  f"copy of {rec['merged_copy_mb']:.0f} MB resident (merged() took {rec['merge_once_ms']:.0f} ms "
                  "once, cold)", "",
                  "| path | fwd ms | fwd peak MB | fwd+bwd ms | fwd+bwd peak MB | y err | grad err | check |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for key, p in rec["paths"].items():
            def f(v, fmt):
                return "-" if v is None else format(v, fmt)
            note = p.get("error") or ("skipped: time" if p.get("skipped") else "")
            extra = f" (vs (b): {p['err_vs_merged']:.1e})" if "err_vs_merged" in p else ""
            lines.append(f"| {p['label']} | {f(p.get('fwd_ms'), '.2f')} | {f(p.get('fwd_peak_mb'), '.0f')} | "
                         f"{f(p.get('fwdbwd_ms'), '.2f')} | {f(p.get('fwdbwd_peak_mb'), '.0f')} | "
                         f"{p['y_err']:.1e}{extra} | "
                         f"{p['grad_err']:.1e} | {'ok' if p['ok'] else 'FAILED'}{' ' + note if note else ''} |")
        lines.append("")
    if data["failed"]:
        lines += ["Cases that failed: " + "; ".join(data["failed"]), ""]
    if data["trimmed"]:
        lines += [f"Not run (time budget {data['settings']['budget_s']:.0f} s): " + ", ".join(data["trimmed"]), ""]
    lines.append(f"Wall time {data['wall_s']:.0f} s.")
    (out / "lora_experts.md").write_text("\n".join(lines) + "\n")


def env_info(device, dtype) -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'}" \
        f"{', TRITON_INTERPRET=1' if os.environ.get('TRITON_INTERPRET') == '1' else ''})"
    return dict(device=name, torch=torch.__version__, triton=tv, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python " + " ".join(sys.argv), dtype=str(dtype).replace("torch.", ""))


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes (D 32, F 48, 48 tokens), fp32 on the CPU (fused kernels interpreted), 1 iteration")
    ap.add_argument("--variants", default="v1,v2")
    ap.add_argument("--tokens", default="", help="comma list (default 4096,16384; smoke 64)")
    ap.add_argument("--budget-s", type=float, default=95.0, help="start no timing after this many seconds")
    ap.add_argument("--iters", type=int, default=None, help="default 10 (smoke 1)")
    ap.add_argument("--warm", type=int, default=None, help="default 3 (smoke 0)")
    ap.add_argument("--pool", type=int, default=2)
    ap.add_argument("--dtype", default="", help="bfloat16 | float32 (default bf16 on GPU, fp32 on CPU)")
    args = ap.parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.budget_s
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    args.iters = args.iters if args.iters is not None else (1 if args.smoke else 10)
    args.warm = args.warm if args.warm is not None else (0 if args.smoke else 3)
    ffn = SMOKE_FFN if args.smoke else FFN
    tokens = [int(t) for t in (args.tokens or ("48" if args.smoke else "4096,16384")).split(",")]
    variants = [v for v in args.variants.split(",") if v]
    cases = [(dict(ffn, variant=v, **VARIANTS[v]), T) for T in tokens for v in variants]
    data = dict(env=env_info(device, dtype), ffn=ffn,
                settings=dict(iters=args.iters, warm=args.warm, pool=args.pool, budget_s=args.budget_s,
                              smoke=args.smoke), results=[], trimmed=[], failed=[])
    print(f"lora_experts: {data['env']['device']}, {data['env']['dtype']}, {len(cases)} cases", flush=True)
    for c, T in cases:
        name = f"{c['variant']} E{c['E']} T{T}"
        if time.time() > deadline - 5:
            data["trimmed"].append(name)
            continue
        print(f"== {name} ({time.time() - t0:.0f}s)", flush=True)
        try:
            data["results"].append(run_case(c, T, args, device, dtype, deadline))
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: record it, go on with the next case
            traceback.print_exc()
            data["failed"].append(f"{name}: {type(err).__name__}: {str(err)[:300]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    data["conclusion"] = conclusion(data["results"])
    data["all_ok"] = not data["failed"] and all(p["ok"] for r in data["results"] for p in r["paths"].values())
    data["wall_s"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_experts.json").write_text(json.dumps(data, indent=1))
    write_report(data, out)
    print("conclusion:", data["conclusion"], flush=True)
    print(f"wrote {out / 'lora_experts.json'} and lora_experts.md ({data['wall_s']:.0f} s)", flush=True)
    return 0 if data["all_ok"] else 1


if __name__ == "__main__":
    if "--smoke" in sys.argv and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused kernels on the CPU (before triton is imported)
    sys.exit(main())
