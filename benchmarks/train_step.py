#!/usr/bin/env python
"""Training step of V-MoE-B/16 (E=8, k=2, MoE every 2nd block) against the dense ViT-B/16, one GPU run.

    python benchmarks/train_step.py --out benchmarks/results          # writes train_step.{json,md}
    python benchmarks/train_step.py --report benchmarks/results/train_step.json   # re-render the md

Both models are zoo models built from the ``vmoe_b16`` preset (the dense one with ``encoder.moe_every=None``),
so they share patch embedding, attention, heads and the training loop; timm's ``vit_base_patch16_224`` is timed
too as an outside reference for the dense step. A step = forward (bf16 autocast, fp32 master weights), cross
entropy + MoE auxiliary loss, backward, AdamW update, on the same batch of random 224px images (a pool of
inputs, so routing changes every step). CUDA events, warm-up, median over steps.

Models run as built (their defaults): on CUDA each MoE layer runs its routing, losses, statistics and fused experts
as one compiled graph (``MoEConfig.compile_routing``) replayed as a CUDA graph (``MoEConfig.cuda_graphs``);
``moe_no_layer_graphs`` and ``moe_uncompiled`` time the same model without the CUDA graphs / without compiling.
In the ``+graph`` runs the whole step is captured as one CUDA graph (the layers' own graphs are off there).

Target (issue 4): ``t_moe <= 1.15 * t_dense * F_moe / F_dense``, F = training FLOPs per image (3x forward),
counted by :func:`forward_flops` (checked against ``torch.utils.flop_counter`` in the tests). Expert FLOPs
are nominal: every token reaches its k experts (capacity 1.05 drops a few; the count does not subtract them).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGET = 1.15
GRAPH_SUFFIX = "+graph"
MOE_OVERRIDES = {"encoder.moe.num_experts": 8, "encoder.moe.top_k": 2, "encoder.moe_every": 2}
DENSE_OVERRIDES = {"encoder.moe_every": None}


def forward_flops(config) -> dict:
    """Forward FLOPs per image of a zoo V-MoE / ViT config (multiply-add = 2), by part.

    Matmuls only (as ``torch.utils.flop_counter``): patch embedding, qkv/out projections, attention scores
    and values, dense MLPs, routers, experts (k per token, nominal), pre-logits and head."""
    enc = config.encoder
    D, H, depth = enc.dim, enc.mlp_dim, enc.depth
    n_patch = (config.image_size // config.patch_size) ** 2
    T = n_patch + (1 if config.classifier == "token" else 0)
    moe_layers = set(enc.moe_layer_indices)
    mlp_mult = 3 if enc.activation == "swiglu" else 2
    parts = {
        "patch_embed": 2 * n_patch * config.in_chans * config.patch_size ** 2 * D,
        "attention_proj": depth * 2 * T * 4 * D * D,
        "attention_scores": depth * 2 * 2 * T * T * D,
        "dense_mlp": (depth - len(moe_layers)) * 2 * T * mlp_mult * D * H,
        "router": len(moe_layers) * 2 * T * D * enc.moe.num_experts,
        "experts": len(moe_layers) * enc.moe.top_k * 2 * T * mlp_mult * D * H,
    }
    rep = config.representation_size or 0
    parts["head"] = 2 * D * rep + 2 * (rep or D) * config.num_classes
    parts["total"] = sum(parts.values())
    return parts


def make_step(model, batch: int, pool: int, lr: float = 1e-4, cuda_graph: bool = False):
    """A closure ``step(i)`` running one optimisation step on input ``i % pool``.

    ``cuda_graph``: capture forward + backward + optimizer step once as a CUDA graph (the MoE layer never syncs
    the host, so the whole step is capturable; router noise still changes every replay) and replay it on the
    input copied into the captured buffers. Removes the host's kernel-launch cost from the step time."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    images = [torch.randn(batch, 3, 224, 224, device=dev, generator=g) for _ in range(pool)]
    labels = [torch.randint(0, 1000, (batch,), device=dev, generator=g) for _ in range(pool)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True, capturable=cuda_graph)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        # Autocast's weight-cast cache must be off under graph capture (the casts have to be recorded).
        with torch.autocast(dev, dtype=torch.bfloat16, cache_enabled=not cuda_graph):
            out = model(x)
            logits = out.logits if hasattr(out, "logits") else out
            loss = F.cross_entropy(logits.float(), y)
            aux = getattr(out, "aux_loss", None)
            if aux is not None:
                loss = loss + aux
        loss.backward()
        opt.step()

    if not cuda_graph:
        def step(i: int) -> None:
            train_step(images[i % pool], labels[i % pool])
            opt.zero_grad(set_to_none=True)

        return step
    static_x, static_y = images[0].clone(), labels[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: Triton compiles, optimizer state is created
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            train_step(static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        train_step(static_x, static_y)

    def step(i: int) -> None:
        static_x.copy_(images[i % pool])
        static_y.copy_(labels[i % pool])
        graph.replay()

    return step


def time_steps(step, warm: int, iters: int) -> dict:
    from moe_layer import cuda_times

    times = cuda_times(step, warm, iters)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            # Process peak (model, optimizer state, graph capture, steps): each run is its own process.
            "peak_gb": torch.cuda.max_memory_allocated() / 2 ** 30, "iters": iters}


MOE_VARIANTS = {  # name -> overrides on top of MOE_OVERRIDES
    "moe": {},
    # routing bookkeeping compiled, but not replayed as CUDA graphs: what the graphs save
    "moe_no_layer_graphs": {"encoder.moe.cuda_graphs": False},
    # routing bookkeeping eager too (compile_routing=False): what compiling it saves
    "moe_uncompiled": {"encoder.moe.compile_routing": False},
    # the plain-PyTorch reference dispatcher, for scale
    "moe_sorted": {"encoder.moe.dispatch": "sorted"},
}


def build_model(name: str, outer_graph: bool = False):
    """One model of the comparison, seeded the same way for every run. ``outer_graph``: the whole step will be
    captured as one CUDA graph, so the MoE layers do not replay CUDA graphs of their own inside it."""
    import zoo

    torch.manual_seed(0)
    if name == "dense":
        return zoo.create_model("vmoe_b16", **DENSE_OVERRIDES)
    if name in MOE_VARIANTS:
        overrides = {**MOE_OVERRIDES, **MOE_VARIANTS[name]}
        if outer_graph:
            overrides["encoder.moe.cuda_graphs"] = False
        return zoo.create_model("vmoe_b16", **overrides)
    if name == "timm_dense":
        import timm

        return timm.create_model("vit_base_patch16_224", num_classes=1000)
    raise KeyError(f"unknown model {name!r}; expected dense, timm_dense or one of {sorted(MOE_VARIANTS)}")


def profile_step(step, out: Path, name: str) -> dict:
    """Kernel count and CPU vs GPU time of one step (is the step launch-bound?)."""
    from torch.profiler import ProfilerActivity, profile

    step(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step(1)
        cpu_ms = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    averages = prof.key_averages()
    table = (averages.table(sort_by="self_cuda_time_total", row_limit=40) + "\n\n"
             + averages.table(sort_by="self_cpu_time_total", row_limit=40))
    (out / f"train_step_profile_{name}.txt").write_text(table)
    return {"kernels": len(kernels), "cpu_launch_ms": cpu_ms,
            "gpu_busy_ms": sum(e.device_time for e in kernels) / 1e3}


def write_report(data: dict, out: Path) -> None:
    env = data["env"]
    r = data["results"]
    lines = ["# Training step: V-MoE-B/16 (E=8, k=2, every 2) vs dense ViT-B/16", "",
             f"- {env['device']}, torch {env['torch']}, triton {env['triton']}, python {env['python']}; {env['date']}",
             f"- command: `{env['command']}`",
             f"- batch {data['batch']} images 224px, bf16 autocast, fp32 AdamW (fused), median of {data['iters']} "
             f"steps after {data['warm']} warm-up steps", ""]
    fm, fd = data["flops"]["moe"]["total"], data["flops"]["dense"]["total"]
    ratio = fm / fd
    lines += [f"Training FLOPs per image (3x forward): V-MoE {3 * fm / 1e9:.1f} G, dense {3 * fd / 1e9:.1f} G, "
              f"ratio {ratio:.3f}.", ""]
    for suffix, how in (("", "eager (Python launches the kernels, except that each MoE layer's routing, losses, "
                                "statistics and fused experts run as one torch.compile graph replayed as a CUDA graph, "
                                "their default on CUDA)"),
                        (GRAPH_SUFFIX, "CUDA graph (both models' whole step captured, replayed)")):
        if "moe" + suffix in r and "dense" + suffix in r:
            t_m, t_d = r["moe" + suffix]["median_ms"], r["dense" + suffix]["median_ms"]
            scaled = t_m / (t_d * ratio)
            ok = scaled <= TARGET
            lines += [f"**Target, {how}** `t_moe <= {TARGET} x t_dense x FLOP ratio`: {t_m:.1f} ms vs {TARGET} x "
                      f"{t_d:.1f} x {ratio:.3f} = {TARGET * t_d * ratio:.1f} ms -> FLOP-scaled time ratio "
                      f"**{scaled:.3f}**, " + ("**met**." if ok else f"**NOT met** (over by a factor "
                                                                   f"{scaled / TARGET:.3f})."), ""]
    if data.get("profile_note"):
        lines += [data["profile_note"], ""]
    lines += ["| model | median ms/step | min | max | images/s | TFLOP/s (nominal) | peak GB | kernels/step | "
              "host ms/step (profiled) | GPU busy ms/step |", "|---|---|---|---|---|---|---|---|---|---|"]
    names = {"moe": "V-MoE-B/16 E8 k2 (fused experts)",
             "moe_no_layer_graphs": "V-MoE-B/16 E8 k2 (fused experts, MoE layers' compiled graphs not replayed as "
                                    "CUDA graphs)",
             "moe_uncompiled": "V-MoE-B/16 E8 k2 (fused experts, routing bookkeeping not compiled)",
             "moe_sorted": "V-MoE-B/16 E8 k2 (sorted reference dispatch)",
             "dense": "ViT-B/16 dense (zoo)", "timm_dense": "ViT-B/16 dense (timm)"}
    for key, res in r.items():
        base_key = key.removesuffix(GRAPH_SUFFIX)
        label = names.get(base_key, base_key) + (", CUDA graph" if key.endswith(GRAPH_SUFFIX) else "")
        fl = data["flops"]["moe" if base_key.startswith("moe") else "dense"]["total"] * 3 * data["batch"]
        p = data.get("profile", {}).get(key, {})
        lines.append(f"| {label} | {res['median_ms']:.2f} | {res['min_ms']:.2f} | {res['max_ms']:.2f} | "
                     f"{data['batch'] / res['median_ms'] * 1e3:.0f} | {fl / res['median_ms'] / 1e9:.0f} | "
                     f"{res['peak_gb']:.1f} | {p.get('kernels', '')} | "
                     f"{p['cpu_launch_ms']:.1f} | {p['gpu_busy_ms']:.1f} |" if p else
                     f"| {label} | {res['median_ms']:.2f} | {res['min_ms']:.2f} | {res['max_ms']:.2f} | "
                     f"{data['batch'] / res['median_ms'] * 1e3:.0f} | {fl / res['median_ms'] / 1e9:.0f} | "
                     f"{res['peak_gb']:.1f} | | | |")
    for key, why in data.get("results_skipped", {}).items():
        lines.append(f"| {key} | skipped: {why} | | | | | | | | |")
    lines += ["", "FLOPs per image by part (forward, G):", "", "| part | V-MoE | dense |", "|---|---|---|"]
    for part in data["flops"]["moe"]:
        lines.append(f"| {part} | {data['flops']['moe'][part] / 1e9:.3f} | {data['flops']['dense'][part] / 1e9:.3f} |")
    (out / "train_step.md").write_text("\n".join(lines) + "\n")


def run_worker(args) -> None:
    name = args.worker.removesuffix(GRAPH_SUFFIX)
    graphed = args.worker.endswith(GRAPH_SUFFIX)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(name, outer_graph=graphed).cuda().train()
    step = make_step(model, args.batch, args.pool, cuda_graph=graphed)
    result = {"timing": time_steps(step, args.warm, args.iters)}
    if args.profile and not graphed:
        result["profile"] = profile_step(step, Path(args.out), name)
    print(json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--models", default="dense,moe,timm_dense,moe_sorted")
    ap.add_argument("--profile", action="store_true", help="also profile one eager step of each model")
    ap.add_argument("--cuda-graph", default="both", choices=["no", "only", "both"],
                    help="time eager steps, CUDA-graph-captured steps, or both")
    ap.add_argument("--report", default="", help="only re-render the md from this json")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: one run, JSON on stdout
    args = ap.parse_args()
    if args.report:
        write_report(json.loads(Path(args.report).read_text()), Path(args.report).parent)
        return
    if args.worker:
        run_worker(args)
        return
    from moe_layer import env_info

    import zoo

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    data = dict(env=env_info(), batch=args.batch, iters=args.iters, warm=args.warm, results={}, profile={},
                flops={"moe": forward_flops(zoo.model_config("vmoe_b16", **MOE_OVERRIDES)),
                       "dense": forward_flops(zoo.model_config("vmoe_b16", **DENSE_OVERRIDES))})
    modes = [False, True] if args.cuda_graph == "both" else [args.cuda_graph == "only"]
    for graphed in modes:
        for name in args.models.split(","):
            if graphed and name == "moe_no_layer_graphs":  # the same run as "moe" there: no layer graphs inside one
                continue
            key = name + (GRAPH_SUFFIX if graphed else "")
            # One process per run: a failed graph capture leaves the CUDA context and RNG unusable for the rest.
            cmd = [sys.executable, __file__, "--worker", key, "--out", str(out), "--batch", str(args.batch),
                   "--iters", str(args.iters), "--warm", str(args.warm), "--pool", str(args.pool)]
            if args.profile:
                cmd.append("--profile")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                data.setdefault("results_skipped", {})[key] = f"rc={proc.returncode}: {err[:300]}"
                print(key, "failed:", proc.stderr[-3000:], flush=True)
                continue
            res = json.loads(lines[-1])
            data["results"][key] = res["timing"]
            if res.get("profile"):
                data["profile"][key] = res["profile"]
            print(key, lines[-1], flush=True)
            (out / "train_step.json").write_text(json.dumps(data, indent=1))
    write_report(data, out)
    print((out / "train_step.md").read_text())


if __name__ == "__main__":
    main()
