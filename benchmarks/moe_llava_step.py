#!/usr/bin/env python
"""One MoE-Tuning stage-III training step of a MoE-LLaVA model: the zoo against the official algorithm, one GPU run.

    python benchmarks/moe_llava_step.py --out benchmarks/results     # Phi-2 x4 shape; writes moe_llava_step.{json,md}
    python benchmarks/moe_llava_step.py --decoder-depth 8 --impls ideal --profile DIR --out DIR
                                                                      # where the ideal step's time goes
    python benchmarks/moe_llava_step.py --preset moe_llava_tiny --device cpu --steps 1 --warmup 0 --batch 2 \
        --text-tokens 8 --fp32 --out /tmp/x   # the CPU smoke run (tests/test_moe_llava_step_benchmark.py)

Both implementations are the same zoo model (``--preset``, default ``moe_llava_phi2_2_7b_4e``: CLIP ViT-L/14-336
tower, mlp2x_gelu projector, Phi-2 decoder with 4 experts top-2 in every other block; random weights), the same
batch (each sample: one image = 576 image tokens after splicing, plus ``--text-tokens`` text tokens, all supervised),
the same step: bf16 autocast over fp32 weights, gradient checkpointing of the decoder blocks, stage III's freeze spec
(experts and routers trainable; :func:`zoo.models.freeze.moe_tuning_stage`), loss = shifted cross entropy + MoE
balance loss, backward, AdamW update. They differ only in the MoE layers:

- ``zoo``: :class:`zoo.moe.MoELayer` as the preset builds it (causal per-sequence capacity 1.5, fused GPU experts,
  routing + losses compiled and replayed as CUDA graphs where enabled);
- ``ideal`` (a reference, not a peer): every MoE layer swapped for ``benchmarks/moe_peers.py:IdealTop2Experts``, the
  two expert passes of every token as perfectly balanced plain GEMMs with no routing work. Not a floor: the zoo's
  fused kernels ran the step faster than it on the H200 (session 14: their backward beats autograd through
  per-expert GEMMs), so deepspeed / ideal is no upper limit on the zoo / deepspeed ratio;
- ``free`` (a ceiling, not a peer): every MoE layer swapped for ``benchmarks/moe_peers.py:FreeMoE``, which costs
  one elementwise product (no experts, routing, loss or their optimizer update; the backward still runs through
  the blocks above). deepspeed / free is the most any MoE-layer implementation could gain over the official
  algorithm in this step, the shared parts (tower, attention, dense blocks, recompute, AdamW) as they are;
- ``deepspeed``: every MoE layer swapped for ``benchmarks/moe_peers.py:DeepSpeedTop2MoE`` holding the same weights:
  DeepSpeed 0.9.5's ``top2gating`` over the micro-batch, one-hot ``[T, E, C]`` einsum dispatch / combine, each
  expert on its buffer (what MoE-LLaVA runs), capacity factor 1.5, min capacity 4, balance loss 0.01.

``--except-moe`` checkpoints the decoder blocks without their MoE layers (``DecoderLM.gradient_checkpointing =
"except_moe"``), for every implementation: the MoE layers (or the peers in their place) run once per step and keep
their activations; the zoo's then keep their CUDA graphs, which whole-block checkpointing turns off.
``--peer-checkpointing blocks`` keeps whole-block checkpointing for the official algorithm (and ``ideal``) whatever
the zoo does: how MoE-LLaVA trains (``--gradient_checkpointing True``: Hugging Face checkpoints whole decoder layers,
the DeepSpeed MoE layer inside). ``free`` always follows the zoo's policy. With ``free`` in the run, the report also
gives each MoE implementation's own cost: its step time over ``free``'s. ``--compile`` turns on the zoo model's
training compile option (``DecoderLM.compile_blocks`` + ``MoELLaVA.compile_tower``, what ``InstructTask(compile=True)``
sets; ``--compile cuda_graphs``: ``compile="cuda_graphs"``) for every implementation; ``--frozen-bf16``,
``--fused-backend`` and ``--no-moe-cuda-graphs`` are the variants session 16 measured
(``benchmarks/results/moe_llava_step.md``).

Each implementation runs in its own process (a clean peak-memory count). Reported: median step time over
``--steps`` after ``--warmup`` steps (CUDA-synchronised wall time), tokens/s = batch x (576 + text tokens) / step,
peak allocated memory. Target (issue 19): zoo >= 2x the tokens/s of the official algorithm.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

TARGET = 2.0
# the decoder's gradient_checkpointing values as the report names them
CHECKPOINTING_NAMES = {True: "whole blocks", "except_moe": "all but the MoE layers", False: "none"}
IMPLS = ("zoo", "deepspeed", "ideal", "free")


def build(args):
    import zoo
    from zoo.models.freeze import apply_freeze, moe_tuning_stage

    with torch.device(args.device):  # build on the device: initialising billions of weights on the CPU takes minutes
        overrides = {} if args.decoder_depth is None else {"decoder.depth": args.decoder_depth}
        if args.no_moe_cuda_graphs:
            overrides["decoder.moe.cuda_graphs"] = False
        model = zoo.create_model(args.preset, **overrides)
    model.decoder.gradient_checkpointing = checkpointing(args)
    apply_freeze(model, moe_tuning_stage(3))
    if args.impl != "zoo":  # after the freeze: the peer holds the same (frozen / trainable) tensors
        import moe_peers

        if args.impl == "deepspeed":
            swapped = moe_peers.replace_moe_layers(model.decoder, moe_peers.DeepSpeedTop2MoE, capacity_factor=1.5,
                                                   min_capacity=4)
        else:
            peer = {"ideal": moe_peers.IdealTop2Experts, "free": moe_peers.FreeMoE}[args.impl]
            swapped = moe_peers.replace_moe_layers(model.decoder, peer)
        assert swapped > 0, "the preset has no MoE layers to compare"
    if args.compile:  # the zoo's training option (InstructTask(compile=...)), for every implementation alike
        model.decoder.compile_blocks = "cuda_graphs" if args.compile == "cuda_graphs" else True
        model.compile_tower = True
    if args.frozen_bf16:
        store_frozen_matmul_weights_in_bf16(model)
    if args.fused_backend != "auto":
        force_fused_backend(args.fused_backend)
    return model.train()


def checkpointing(args):
    """The decoder's ``gradient_checkpointing`` for this run: whole blocks (default), all but the MoE layers
    (``--except-moe``: the peers sit where the MoE layers were) or none; ``--peer-checkpointing`` sets the official
    algorithm's and ``ideal``'s apart (``free`` is the zoo without MoE cost: it follows the zoo)."""
    if args.impl in ("deepspeed", "ideal") and args.peer_checkpointing is not None:
        return {"blocks": True, "except_moe": "except_moe", "none": False}[args.peer_checkpointing]
    return False if args.no_checkpointing else ("except_moe" if args.except_moe else True)


def store_frozen_matmul_weights_in_bf16(model) -> None:
    """``--frozen-bf16``: every Linear / Conv2d whose own parameters are all frozen keeps them in bf16. Under bf16
    autocast its output is the same bits (autocast casts those weights to bf16 at every use, forward and checkpoint
    recompute); only the casts go, as in a DeepSpeed bf16 run, which stores all weights in bf16. For every
    implementation alike; ``train.py`` does not do this (its frozen weights stay fp32)."""
    from torch import nn

    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if isinstance(m, (nn.Linear, nn.Conv2d)) and own and not any(p.requires_grad for p in own):
            m.to(torch.bfloat16)


def force_fused_backend(backend: str) -> None:
    """``--fused-backend``: the zoo's fused expert kernels use ``backend`` at every shape instead of
    :func:`zoo.kernels.fused_moe.auto_backend`'s per-shape rule (to measure the rule's choice against the others)."""
    import importlib

    kernels = importlib.import_module("zoo.kernels.fused_moe")  # the module (zoo.kernels.fused_moe is its function)
    kernels.choose_backend = lambda *shape: backend


def batch(model, args, gen):
    from zoo.models.multimodal import IMAGE_TOKEN_ID

    cfg = model.config
    B, L = args.batch, args.text_tokens
    ids = torch.randint(0, cfg.decoder.vocab_size, (B, L + 1), generator=gen)
    ids[:, 1] = IMAGE_TOKEN_ID  # one token of text, the image, then the rest of the text
    labels = ids.clone()
    labels[:, :2] = -100
    images = torch.randn(B, cfg.vision.in_chans, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    dev = args.device
    return ids.to(dev), torch.ones_like(ids, dtype=torch.bool).to(dev), images.to(dev), labels.to(dev)


def run_one(args) -> dict:
    torch.manual_seed(0)
    model = build(args)
    params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=args.device == "cuda")
    gen = torch.Generator().manual_seed(0)
    inputs = [batch(model, args, gen) for _ in range(2)]  # two batches: routing changes between steps
    image_tokens = model.vision_tower.num_tokens
    cuda = args.device == "cuda"
    peer = None
    if args.impl == "deepspeed":
        import moe_peers
        peer = moe_peers

    def step(i, timer=None):
        ids, mask, images, labels = inputs[i % len(inputs)]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=not args.fp32):
            out = model(ids, mask, images, labels)
            loss = out.loss
            if peer is not None:
                loss = loss + 0.01 * peer.deepspeed_aux_loss(model.decoder)
        if timer:
            timer.mark("forward: projector, decoder, loss")
        loss.backward()
        if timer:
            timer.mark("backward (with the checkpoint recompute)")
        opt.step()
        if timer:
            timer.mark("optimizer")
        return loss

    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps):
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        t0 = time.perf_counter()
        loss = step(i)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = args.batch * (image_tokens + args.text_tokens)
    profile = profile_steps(model, step, args) if args.profile else None
    return dict(impl=args.impl, preset=args.preset, decoder_depth=model.config.decoder.depth, batch=args.batch,
                image_tokens=image_tokens, profile=profile,
                text_tokens=args.text_tokens, tokens_per_step=tokens, step_ms=1e3 * step_s,
                step_ms_all=[round(1e3 * t, 2) for t in times], tokens_per_s=tokens / step_s,
                peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                params=params, trainable_params=sum(p.numel() for p in trainable), final_loss=float(loss),
                gradient_checkpointing=checkpointing(args), dtype="float32" if args.fp32 else "bf16-autocast")


class PhaseTimer:
    """Milliseconds per phase of a step, each phase closed by a device synchronisation so that its kernels count in
    it. For the profile only: the syncs remove the overlap a timed step has, so the phases add up to a little more
    than the step."""

    def __init__(self, cuda: bool) -> None:
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.ms: dict[str, list[float]] = {}

    def start(self) -> None:
        self.sync()
        self.t = time.perf_counter()

    def mark(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.ms.setdefault(phase, []).append(1e3 * (now - self.t))
        self.t = now


def idle_gaps(kernels: list[tuple[float, float, str]], top: int = 8) -> tuple[float, float, list[dict]]:
    """GPU idle time inside a run of kernels: ``kernels`` [(start_us, end_us, name)] in any order (overlapping
    kernels count once). Returns (busy us, idle us between the first start and the last end, the ``top`` longest
    idle gaps as dicts of ``us``, the kernel ``before`` and the one ``after``). Idle gaps inside a step are where the
    GPU waited for the host: launch-bound stretches, host syncs, Python between launches."""
    if not kernels:
        return 0.0, 0.0, []
    ordered = sorted(kernels)
    busy, idle, gaps = 0.0, 0.0, []
    run_start, run_end, last = ordered[0][0], ordered[0][1], ordered[0][2]
    for start, end, name in ordered[1:]:
        if start > run_end:  # the GPU had nothing to run in [run_end, start)
            busy += run_end - run_start
            idle += start - run_end
            gaps.append(dict(us=round(start - run_end, 1), before=last[:80], after=name[:80]))
            run_start = start
        if end >= run_end:
            run_end, last = end, name
    busy += run_end - run_start
    gaps.sort(key=lambda g: -g["us"])
    return busy, idle, gaps[:top]


def profile_steps(model, step, args, steps: int = 3) -> dict:
    """Where a step's time goes (``--profile DIR``): the median ms of each phase over ``steps`` steps (the frozen
    vision tower and projector apart), and one ``torch.profiler`` table of the kernels / ops by self
    device time over two more steps, written to ``DIR/moe_llava_step_profile_<impl>.txt``; its top rows (ms per
    step) come back in the result."""
    cuda = args.device == "cuda"
    timer = PhaseTimer(cuda)
    encode_images = model.encode_images

    def timed_encode_images(images):  # not module hooks: a compiled tower (--compile) does not run them
        timer.mark("forward: before the tower")
        features = encode_images(images)
        timer.mark("forward: vision tower + projector")
        return features

    model.encode_images = timed_encode_images
    try:
        for i in range(steps):
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()
            timer.start()
            step(i, timer)
    finally:
        del model.encode_images  # the method again
    phases = {name: round(statistics.median(ms), 2) for name, ms in timer.ms.items()}
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    profiled = 2
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(profiled):
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()
            step(i)
        timer.sync()
    gpu = None
    if cuda:  # where the GPU waited (the zoo's steps spread far more than the peer's: session 15)
        busy, idle, gaps = idle_gaps([(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                                      if e.device_type == torch.autograd.DeviceType.CUDA])
        gpu = dict(busy_ms_per_step=round(busy / 1e3 / profiled, 2), idle_ms_per_step=round(idle / 1e3 / profiled, 2),
                   longest_gaps=gaps)
    events = prof.key_averages()
    # the device's own time where there is one (kernels), else the CPU's (a CPU smoke run)
    field = "self_device_time_total" if cuda else "self_cpu_time_total"
    ranked = sorted(events, key=lambda e: getattr(e, field, 0.0), reverse=True)
    top = [dict(name=e.key[:120], calls_per_step=e.count / profiled,
                ms_per_step=round(getattr(e, field, 0.0) / 1e3 / profiled, 3)) for e in ranked[:25]]
    args.profile.mkdir(parents=True, exist_ok=True)
    (args.profile / f"moe_llava_step_profile_{args.impl}.txt").write_text(
        f"{args.impl}: {profiled} steps, rows by {field} (microseconds, both steps together)\n\n"
        + events.table(sort_by=field, row_limit=60) + "\n")
    return dict(phases_ms=phases, top_ops=top, table=f"moe_llava_step_profile_{args.impl}.txt", gpu=gpu)


def env_info(args) -> dict:
    dev = torch.cuda.get_device_properties(0).name if args.device == "cuda" else platform.processor() or "cpu"
    return dict(device=dev, torch=torch.__version__, python=platform.python_version(),
                command="python " + " ".join(sys.argv),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def write_report(data: dict, out: Path) -> None:
    rows = {r["impl"]: r for r in data["results"] if "error" not in r}
    env = data["env"]
    lines = [f"# MoE-LLaVA stage-III training step ({env['device']}, {env['date']})", "",
             f"torch {env['torch']}. Command: `{env['command']}`", "",
             "One step = forward (bf16 autocast) + loss + backward (gradient checkpointing) + AdamW on the experts and "
             "routers (stage III's freeze spec); random weights and inputs (`benchmarks/moe_llava_step.py`).", "",
             f"Target: zoo >= {TARGET:.0f}x the tokens/s of the official algorithm (DeepSpeed 0.9.5 top-2 einsum "
             "dispatch, `benchmarks/moe_peers.py:DeepSpeedTop2MoE`).", "",
             "| impl | preset | decoder blocks | batch | tokens/step | checkpointing | step ms (median) | tokens/s | peak GB "
             "| trainable params |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        if "error" in r:
            lines.append(f"| {r['impl']} | failed: {r['error'][:200]} |  |  |  |  |  |  |  |  |")
            continue
        peak = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "n/a"
        lines.append(f"| {r['impl']} | {r['preset']} | {r.get('decoder_depth', '')} | {r['batch']} | {r['tokens_per_step']} | "
                     f"{CHECKPOINTING_NAMES[r['gradient_checkpointing']]} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {peak} | {r['trainable_params']:,} |")
    def over_official(impl: str, key: str):
        """tokens/s of ``impl`` / the official algorithm's, stored as ``data[key]``; None if either did not run."""
        if not {impl, "deepspeed"} <= set(rows):
            return None
        data[key] = rows[impl]["tokens_per_s"] / rows["deepspeed"]["tokens_per_s"]
        return data[key]

    ratio = over_official("zoo", "speedup")
    if ratio is not None:
        lines += ["", f"zoo / official tokens/s: **{ratio:.2f}x** (target {TARGET:.0f}x: "
                  f"{'met' if ratio >= TARGET else 'missed'})."]
    bound = over_official("ideal", "bound")
    if bound is not None:
        lines += ["", f"Bound: the step with every MoE layer as perfectly balanced top-2 plain GEMMs and no routing "
                  f"work (`ideal`) runs {bound:.2f}x the official algorithm's tokens/s. A reference, not a floor: "
                  "fused kernels can beat plain GEMMs through autograd (the zoo did by 7 ms on the H200 in session "
                  "14)."]
        if "zoo" in rows:
            reference = rows["ideal"]["step_ms"]
            lines.append(f"MoE layers against that reference: the zoo's {rows['zoo']['step_ms'] - reference:+.1f} ms "
                         f"a step, the official algorithm's {rows['deepspeed']['step_ms'] - reference:+.1f} ms.")
    ceiling = over_official("free", "ceiling")
    if ceiling is not None:
        shared = (f"; the shared parts take {rows['free']['step_ms']:.1f} ms of the zoo's "
                  f"{rows['zoo']['step_ms']:.1f} ms" if "zoo" in rows else "")
        lines += ["", f"Ceiling: with every MoE layer costing nothing (`free`: a trainable scalar times its input; "
                  f"no experts, routing, loss or their optimizer update) the step runs {ceiling:.2f}x the official "
                  f"algorithm's tokens/s: no MoE-layer implementation can exceed that here (target "
                  f"{TARGET:.0f}x: {'reachable' if ceiling >= TARGET else 'out of reach'} by MoE-layer work "
                  f"alone{shared})."]
        if "zoo" in rows:  # the MoE layers alone: each step's time over the free step's (their optimizer update too)
            free = rows["free"]["step_ms"]
            data["moe_layers_ms"] = {impl: rows[impl]["step_ms"] - free for impl in ("zoo", "deepspeed")}
            zoo_ms, official_ms = data["moe_layers_ms"]["zoo"], data["moe_layers_ms"]["deepspeed"]
            lines.append(f"The MoE layers alone (step time over `free`'s, their optimizer update included): the "
                         f"zoo's {zoo_ms:.1f} ms, the official algorithm's {official_ms:.1f} ms "
                         f"({official_ms / zoo_ms:.2f}x).")
    profiled = {impl: r["profile"] for impl, r in rows.items() if r.get("profile")}
    busy = {impl: p["gpu"]["busy_ms_per_step"] for impl, p in profiled.items() if p.get("gpu")}
    if {"zoo", "deepspeed"} <= set(busy):  # the ratio a step would read were neither waiting for its host
        data["gpu_work_ratio"] = busy["deepspeed"] / busy["zoo"]
        lines += ["", f"GPU work a step (profiled, kernels running): the zoo's {busy['zoo']:.1f} ms, the official "
                  f"algorithm's {busy['deepspeed']:.1f} ms ({data['gpu_work_ratio']:.2f}x): the ratio of the steps "
                  "if neither waited for its host."]
    if profiled:
        impls = list(profiled)
        phases = list(dict.fromkeys(ph for p in profiled.values() for ph in p["phases_ms"]))
        lines += ["", "## Where a step's time goes (`--profile`)", "",
                  "Median ms per phase over 3 steps, each phase closed by a device sync (so they add up to a little "
                  "more than the timed step):", "",
                  "| phase | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
        for ph in phases:
            cells = " | ".join(f"{profiled[i]['phases_ms'].get(ph, 0.0):.1f}" for i in impls)
            lines.append(f"| {ph} | {cells} |")
        for impl in impls:
            gpu = profiled[impl].get("gpu")
            if gpu:
                lines += ["", f"`{impl}` on the GPU, per profiled step: {gpu['busy_ms_per_step']:.1f} ms running "
                          f"kernels, {gpu['idle_ms_per_step']:.1f} ms idle between them (waiting for the host). "
                          "Longest gaps: " + "; ".join(f"{g['us'] / 1e3:.2f} ms after `{g['before'][:40]}`"
                                                       for g in gpu["longest_gaps"][:4]) + "."]
            lines += ["", f"Top ops of `{impl}` by self time, ms per step "
                          f"(full table: `{profiled[impl]['table']}`):", "",
                      "| op | calls / step | ms / step |", "|---|---|---|"]
            lines += [f"| `{t['name'][:90]}` | {t['calls_per_step']:g} | {t['ms_per_step']:.2f} |"
                      for t in profiled[impl]["top_ops"][:12]]
    (out / "moe_llava_step.md").write_text("\n".join(lines) + "\n")
    (out / "moe_llava_step.json").write_text(json.dumps(data, indent=1) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="moe_llava_phi2_2_7b_4e")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--decoder-depth", type=int, default=None,
                    help="fewer decoder blocks than the preset (same widths; MoE in every other block still): the "
                         "per-layer speed ratio at a fraction of the build and compile time")
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast (CPU smoke runs)")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--except-moe", action="store_true",
                    help="checkpoint the decoder blocks except their MoE layers, which run once per step (with "
                         "their CUDA graphs, for the zoo) and keep their activations; for every implementation")
    ap.add_argument("--peer-checkpointing", choices=("blocks", "except_moe", "none"),
                    help="the official algorithm's (and ideal's) checkpointing when it differs from the zoo's: "
                         "'blocks' is how MoE-LLaVA trains (Hugging Face checkpointing of whole decoder layers, "
                         "the DeepSpeed MoE layer inside); default: the zoo's")
    ap.add_argument("--compile", nargs="?", const="blocks", choices=("blocks", "cuda_graphs"),
                    help="the decoder blocks and the vision tower through torch.compile (DecoderLM.compile_blocks, "
                         "MoELLaVA.compile_tower: the tasks' compile option), for every implementation; "
                         "'cuda_graphs': the compiled decoder replayed as CUDA graphs (compile_blocks='cuda_graphs')")
    ap.add_argument("--frozen-bf16", action="store_true",
                    help="frozen Linear / Conv2d weights stored in bf16, for every implementation (the same bits "
                         "under bf16 autocast, without its casts)")
    ap.add_argument("--no-moe-cuda-graphs", action="store_true",
                    help="the zoo's MoE layers compile their routing but replay no CUDA graphs "
                         "(MoEConfig.cuda_graphs=False)")
    ap.add_argument("--fused-backend", choices=("auto", "hybrid", "grouped_mm", "triton"), default="auto",
                    help="the zoo's fused expert-GEMM backend at every shape (default: the per-shape rule)")
    ap.add_argument("--impl", choices=IMPLS, help="run one implementation in this process (else: each in its own)")
    ap.add_argument("--impls", default=",".join(IMPLS),
                    help="which implementations to run, each in its own process, comma-separated (default: all)")
    ap.add_argument("--out", type=Path, help="folder for moe_llava_step.{json,md}")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="after the timed steps, split a step's time into phases and write a torch.profiler table "
                         "per implementation to DIR (the phases and top ops also go to the JSON / Markdown)")
    args = ap.parse_args(argv)
    if args.no_checkpointing and args.except_moe:
        ap.error("--except-moe is a kind of checkpointing: drop --no-checkpointing, or --except-moe")
    if args.impl:
        result = run_one(args)
        print(json.dumps(result))
        return result
    impls = [i for i in args.impls.split(",") if i]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        ap.error(f"--impls: unknown {sorted(unknown)}; choose from {', '.join(IMPLS)}")
    results = []
    for impl in impls:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--impl", impl]
        cmd = [c for i, c in enumerate(cmd) if not (c == "--out" or (i > 0 and cmd[i - 1] == "--out"))]
        print(f"[moe_llava_step] {impl} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"[moe_llava_step] {impl}: {results[-1]['tokens_per_s']:.0f} tokens/s, step "
                  f"{results[-1]['step_ms']:.1f} ms", flush=True)
        else:
            err = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            results.append(dict(impl=impl, error=err))
            print(f"[moe_llava_step] {impl} failed:\n{proc.stderr[-3000:]}", flush=True)
    data = dict(env=env_info(args), results=results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_report(data, args.out)
    return data


if __name__ == "__main__":
    main()
