#!/usr/bin/env python
"""Multi-GPU scaling of training with expert parallelism (``zoo.distributed``): V-MoE-B/16 and an LLM-style
MoE layer on 1, 2, 4, 8 GPUs of one host.

    python benchmarks/scaling.py --out benchmarks/results             # GPUs 1,2,4,8 (those present)
    python benchmarks/scaling.py --world-sizes 1 2 --workloads llm_moe_layer --steps 10
    python benchmarks/scaling.py --smoke --out /tmp/scaling           # CPU + gloo, 1 and 2 processes, tiny shapes
    python benchmarks/scaling.py --report benchmarks/results/scaling.json   # re-render the markdown

For each world size N the script starts N processes (one per GPU, NCCL; gloo on CPU) and times full training
steps (forward, backward, gradient synchronisation, AdamW step) in two modes:

* ``ep``  experts sharded over the N ranks (E/N per GPU), tokens exchanged by all-to-all, DDP all-reduces only
  the shared parameters (``zoo.distributed.shard_experts`` + ``wrap_ddp``: what ``ExpertParallelStrategy``
  does under Lightning);
* ``ddp`` plain DDP, every GPU holds every expert, all gradients all-reduced (the baseline).

Weak scaling: the per-GPU batch is fixed, so the global batch grows with N. Reported per (workload, mode, N):
step time (slowest rank), throughput (images or tokens per second, whole job), scaling efficiency
``throughput_N / (N * throughput_1)``, all-to-all time per step and its share of the step (CUDA events around
each all-to-all, forward and backward, mean over ranks; includes waiting for the slowest rank), peak memory.
Writes ``scaling.json`` and ``scaling.md`` under ``--out``.

Workloads (per GPU):
  vmoe_b16       the ``vmoe_b16`` preset (E=32, k=2, MoE every 2nd block, groups of 8 images, capacity 1.05),
                 224x224 images, batch 32 per GPU, bf16 autocast, cross entropy + auxiliary losses.
  llm_moe_layer  one Mixtral-style MoE layer: D=4096, H=14336 SwiGLU experts, E=8, top-2, renormalised, dropless,
                 bf16 parameters, 8192 tokens (4 x 2048) per GPU; loss = mean(y^2) (fwd + bwd + AdamW).
``--smoke`` replaces them by ``vmoe_tiny_test`` and a D=32 layer and runs on CPU with gloo (the CI test).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import zoo  # noqa: E402
from zoo.distributed import comm_timer, shard_experts, spawn, sync_expert_grads, wrap_ddp  # noqa: E402
from zoo.moe import MoEConfig, MoELayer  # noqa: E402

WORKLOADS = {
    "vmoe_b16": dict(kind="vmoe", preset="vmoe_b16", overrides={}, batch=32, unit="images"),
    "llm_moe_layer": dict(kind="layer", D=4096, H=14336, E=8, k=2, batch=4, seq=2048, unit="tokens"),
}
SMOKE_WORKLOADS = {
    "vmoe_b16": dict(kind="vmoe", preset="vmoe_tiny_test", overrides={}, batch=4, unit="images"),
    "llm_moe_layer": dict(kind="layer", D=32, H=64, E=4, k=2, batch=2, seq=16, unit="tokens"),
}


# ------------------------------------------------------------------------------------------- one case
def _num_experts(wl: dict) -> int:
    if wl["kind"] == "layer":
        return wl["E"]
    return zoo.model_config(wl["preset"], **wl["overrides"]).encoder.moe.num_experts


def _build(wl: dict, device: torch.device):
    torch.manual_seed(0)
    if wl["kind"] == "vmoe":
        model = zoo.create_model(wl["preset"], **wl["overrides"]).to(device)
        cfg = model.config
        g = torch.Generator(device=device).manual_seed(1 + (dist.get_rank() if dist.is_initialized() else 0))
        images = torch.randn(wl["batch"], cfg.in_chans, cfg.image_size, cfg.image_size, device=device, generator=g)
        labels = torch.randint(0, cfg.num_classes, (wl["batch"],), device=device, generator=g)

        def loss_fn(net):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = net(images)
                return F.cross_entropy(out.logits.float(), labels) + out.aux_loss.float()
        return model, loss_fn, wl["batch"]
    cfg = MoEConfig(num_experts=wl["E"], top_k=wl["k"], router="topk", noise_std=0.0, renormalize=True,
                    batch_priority=False, dropless=True, group_size=None, activation="swiglu", expert_bias=False,
                    importance_loss_weight=0.0, load_loss_weight=0.0, switch_loss_weight=0.01)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = MoELayer(wl["D"], wl["H"], cfg).to(device, dtype)
    g = torch.Generator(device=device).manual_seed(1 + (dist.get_rank() if dist.is_initialized() else 0))
    x = torch.randn(wl["batch"], wl["seq"], wl["D"], device=device, dtype=dtype, generator=g)

    def loss_fn(net):
        y = net(x)
        return y.float().square().mean() + model.aux.loss.float()
    return model, loss_fn, wl["batch"] * wl["seq"]


def run_case(name: str, wl: dict, mode: str, steps: int, warmup: int, device: torch.device) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model, loss_fn, units = _build(wl, device)
    ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
    if mode == "ep":
        shard_experts(model)
        net = wrap_ddp(model, **ddp_kwargs)
    else:
        net = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step():
        loss = loss_fn(net)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_expert_grads(model)
        opt.step()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with comm_timer() as timer:
        t0 = time.perf_counter()
        step_times = []
        for _ in range(steps):
            ts = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - ts)
        sync()
        elapsed = time.perf_counter() - t0
        a2a = timer.seconds
        calls, nbytes = timer.calls, timer.bytes
    stats = torch.tensor([elapsed, a2a, a2a / elapsed, statistics.median(step_times)], dtype=torch.float64,
                         device=device)
    slowest = stats.clone()
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    mean = stats.clone()
    dist.all_reduce(mean)
    mean /= world
    step_s = slowest[0].item() / steps
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    n_params = sum(p.numel() for p in model.parameters())  # this rank's (experts: its shard in ep mode)
    return {
        "workload": name, "mode": mode, "world_size": world, "unit": wl["unit"],
        "per_gpu_batch": units, "global_batch": units * world, "steps": steps,
        "step_ms": 1e3 * step_s, "median_step_ms_slowest_rank": 1e3 * slowest[3].item(),
        "throughput": units * world / step_s, "throughput_per_gpu": units / step_s,
        "a2a_ms_per_step": 1e3 * mean[1].item() / steps, "a2a_share": mean[2].item(),
        "a2a_calls_per_step": calls / steps, "a2a_mb_per_step_rank0": nbytes / steps / 2**20,
        "peak_mem_gb_rank0": mem, "params_per_rank": n_params,
    }


def worker(rank: int, world: int, spec: dict, out_dir: str) -> None:
    device = torch.device("cuda", rank % torch.cuda.device_count()) if spec["device"] == "cuda" else torch.device("cpu")
    results = []
    for name in spec["workloads"]:
        wl = spec["workload_defs"][name]
        for mode in spec["modes"]:
            if mode == "ep" and _num_experts(wl) % world:
                results.append({"workload": name, "mode": mode, "world_size": world,
                                "skipped": f"E={_num_experts(wl)} not divisible by {world}"})
                continue
            try:
                results.append(run_case(name, wl, mode, spec["steps"], spec["warmup"], device))
            except torch.cuda.OutOfMemoryError as e:  # every rank runs the same shapes: all fail alike
                results.append({"workload": name, "mode": mode, "world_size": world, "error": f"OOM: {e}"[:300]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if rank == 0:
                print(json.dumps(results[-1]), flush=True)
    if rank == 0:
        with open(os.path.join(out_dir, f"world{world}.json"), "w") as f:
            json.dump(results, f)


# ------------------------------------------------------------------------------------------- report
def add_efficiency(results: list[dict]) -> None:
    base = {(r["workload"], r["mode"]): r["throughput"] for r in results
            if r.get("world_size") == 1 and "throughput" in r}
    for r in results:
        b = base.get((r["workload"], r["mode"]))
        if "throughput" in r and b:
            r["scaling_efficiency"] = r["throughput"] / (r["world_size"] * b)


def render_md(report: dict) -> str:
    env = report["env"]
    lines = ["# Multi-GPU scaling: expert parallelism vs. plain DDP", "",
             f"{env.get('device_name')} x up to {max(report['world_sizes'])}, torch {env.get('torch')}, "
             f"backend {env.get('backend')}, {env.get('date')}, commit {env.get('commit')}"
             + (" — **smoke run (CPU, tiny shapes): not a performance result**" if report.get("smoke") else ""), "",
             "Weak scaling (fixed per-GPU batch). Efficiency = throughput_N / (N x throughput_1) of the same mode; "
             "a2a = all-to-all time (fwd + bwd) per step and its share of the step, mean over ranks.", ""]
    for name in report["workloads"]:
        wl = report["workload_defs"][name]
        lines += [f"## {name}", "", "```", json.dumps(wl), "```", "",
                  "| mode | GPUs | global batch | step (ms) | throughput | per GPU | efficiency | a2a (ms) | a2a share "
                  "| peak mem (GB) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["results"]:
            if r["workload"] != name:
                continue
            if "throughput" not in r:
                lines.append(f"| {r['mode']} | {r['world_size']} | {r.get('skipped') or r.get('error')} |||||||")
                continue
            eff = r.get("scaling_efficiency")
            mem = r.get("peak_mem_gb_rank0")
            lines.append(
                f"| {r['mode']} | {r['world_size']} | {r['global_batch']} {r['unit']} | {r['step_ms']:.1f} | "
                f"{r['throughput']:.1f} {r['unit']}/s | {r['throughput_per_gpu']:.1f} | "
                f"{'' if eff is None else f'{100 * eff:.0f}%'} | {r['a2a_ms_per_step']:.2f} | "
                f"{100 * r['a2a_share']:.1f}% | {'' if mem is None else f'{mem:.1f}'} |")
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    add_efficiency(report["results"])
    (out / "scaling.json").write_text(json.dumps(report, indent=1))
    (out / "scaling.md").write_text(render_md(report))
    print(f"wrote {out / 'scaling.json'} and {out / 'scaling.md'}")


def _env(device: str, backend: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    return {"torch": torch.__version__, "python": platform.python_version(), "backend": backend,
            "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "CPU",
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device == "cuda" else None,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--world-sizes", "--gpus", type=int, nargs="+", default=None,
                   help="process counts to run (default: 1 2 4 8 up to the GPUs present; smoke: 1 2)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--modes", nargs="+", default=["ep", "ddp"], choices=["ep", "ddp"])
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; smoke 1)")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (images, or sequences) override")
    p.add_argument("--smoke", action="store_true", help="CPU + gloo, tiny shapes (what CI runs)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--start-method", choices=["spawn", "fork"], default=None,
                   help="process start (default: spawn with CUDA, fork on CPU)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--report", type=Path, default=None, help="only re-render the markdown of this scaling.json")
    args = p.parse_args(argv)
    if args.report:
        write_report(json.loads(args.report.read_text()), args.report.parent)
        return
    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    backend = "nccl" if device == "cuda" else "gloo"
    defs = {k: dict(v) for k, v in (SMOKE_WORKLOADS if args.smoke else WORKLOADS).items()}
    if args.batch:
        for wl in defs.values():
            wl["batch"] = args.batch
    available = torch.cuda.device_count() if device == "cuda" else 2
    sizes = args.world_sizes or [n for n in (1, 2, 4, 8) if n <= available]
    if device == "cuda" and max(sizes) > available:
        raise SystemExit(f"asked for {max(sizes)} processes but only {available} GPUs are visible")
    spec = {"device": device, "workloads": args.workloads, "workload_defs": defs, "modes": args.modes,
            "steps": args.steps or (2 if args.smoke else 20), "warmup": args.warmup or (1 if args.smoke else 5)}
    start = args.start_method or ("spawn" if device == "cuda" else "fork")
    threads = 1 if device == "cpu" else max(1, (os.cpu_count() or 1) // max(sizes))
    report = {"smoke": args.smoke, "env": _env(device, backend), "world_sizes": sizes, "results": [], **spec}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            try:
                spawn(worker, n, spec, tmp, backend=backend, threads=threads, start_method=start)
                report["results"] += json.loads((Path(tmp) / f"world{n}.json").read_text())
            except Exception:  # keep what the other world sizes measured
                traceback.print_exc()
                report["results"].append({"workload": "*", "mode": "*", "world_size": n,
                                          "error": traceback.format_exc(limit=2)[-300:]})
            print(f"world size {n}: {time.time() - t0:.1f}s", flush=True)
        write_report(report, args.out)  # after every world size, so a cut-off run keeps its results


if __name__ == "__main__":
    main()
