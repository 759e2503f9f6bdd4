#!/usr/bin/env python
"""Decoder-LM generation benchmark (issue 18 item 6), one GPU run, bf16, random weights.

    python benchmarks/generate.py --out benchmarks/results            # writes generate.{json,md,png}

Shapes: Phi-2x4 (MoE-LLaVA-Phi2: Phi-2 with 4 experts, top-2, MoE every other block from 0) and Mixtral-8x7B cut
to ``--mixtral-depth`` (4) blocks. Per shape and batch size (1 and 32):
  * prefill tokens/s: one forward of B x ``--prompt`` tokens into an empty KV cache;
  * decode tokens/s: ``--new`` single-token steps after that prefill (B tokens per step);
  * decode as a fraction of the bandwidth limit: bytes a step must read (every dense weight, the experts the step's
    tokens chose in each MoE layer, and the KV cache filled so far; of an untied input embedding table only the
    step's B token rows) / the device's copy bandwidth (measured in the same run: read + write of a 2 GiB buffer),
    against the measured step time.
  * ``--profile``: where a batch-1 decode step's time goes (``profile_<model>.md``): the GPU kernels of one step
    (count, summed kernel time, grouped by kind, the slowest kernels) with the step eager and, where it works,
    inside its CUDA graph, and the same for a batch-1 prefill; kernel time well under the step time means launch
    gaps, near it means slow kernels.
Mixtral is also run in transformers' MixtralForCausalLM on the same weights (converted from its state dict with
zoo.convert.hf_lm): its eager path (DynamicCache) and, where it works, static cache + torch.compile.
The zoo models run with fused q / k / v projections (``DecoderLM.fuse_qkv_``; ``--no-fuse-qkv`` keeps them apart).
Zoo decode steps run eagerly and, separately, as replays of one CUDA graph of the step (the KV cache is
preallocated and its next slot lives on the device, so a captured step stays valid; a failed capture is recorded
as an error row, the eager rows stand). With ``--compile`` zoo decode is also timed with the step compiled by
``torch.compile`` (``zoo.models.generate.compiled_decode_step``: inductor fuses the norms, RoPE, residual adds,
activations and routing ops that dominate a batch-1 step): "zoo + compile" (compiled step, launched from Python)
and "zoo + compile + CUDA graph" (the compiled step captured in the same kind of CUDA graph); these rows' prefill runs
through the same compiled function (``CompiledDecodeStep.prefill``, compiled per prompt length). Timings:
CUDA-synchronised wall clock, median of ``--repeats`` runs after a warm-up run. Zoo rows run as
``zoo.models.generate`` does, inside ``routing_statistics_off()`` (no MoE losses or statistics); the experts a
step chose (for its bytes) come from one more, untimed eager run per model and batch size with them on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
import traceback
import weakref
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import zoo  # noqa: E402
from zoo.models.generate import compiled_decode_step  # noqa: E402
from zoo.moe import moe_layers, routing_statistics_off  # noqa: E402


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def sync_time(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once: 2 x size moved)."""
    n = int(gib * 2**30)
    src, dst = torch.empty(n, dtype=torch.uint8, device=DEVICE), torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst.copy_(src)
    times = [sync_time(lambda: dst.copy_(src)) for _ in range(10)]
    del src, dst
    return 2 * n / statistics.median(times)


def phi2x4_config(depth: int | None):
    cfg = zoo.model_config("phi2")
    moe = zoo.MoEConfig(num_experts=4, top_k=2, renormalize=True, dropless=True, noise_std=0.0, batch_priority=False,
                        group_size=1, activation="gelu_tanh", expert_bias=True, importance_loss_weight=0.0,
                        load_loss_weight=0.0, switch_loss_weight=0.01)
    return replace(cfg, depth=depth or cfg.depth, moe=moe, moe_placement="sparse")


def mixtral_config(depth: int):
    return replace(zoo.model_config("mixtral_8x7b"), depth=depth)


def shrink(cfg):
    """``--smoke``: the same layout at toy width (a CPU check that the script runs end to end)."""
    return replace(cfg, vocab_size=256, dim=64, num_heads=4, num_kv_heads=2 if cfg.num_kv_heads else None,
                   mlp_dim=128, depth=min(cfg.depth, 2), max_seq_len=512)


def weight_bytes(model) -> tuple[int, list[tuple[int, int]]]:
    """(bytes of every non-expert parameter a step reads in full, [(bytes of one expert, E) per MoE layer]).
    An untied input embedding table is left out: a step reads only its B token rows (see :func:`embedding_row_bytes`;
    a tied one is read whole by the LM head)."""
    expert_params = {id(p) for layer in moe_layers(model) for p in layer.experts.parameters()}
    if model.embed.weight is not model.lm_head.weight:
        expert_params.add(id(model.embed.weight))  # not read in full: counted per token row instead
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in expert_params)
    per_layer = []
    for layer in moe_layers(model):
        total = sum(p.numel() * p.element_size() for p in layer.experts.parameters())
        per_layer.append((total // layer.config.num_experts, layer.config.num_experts))
    return dense, per_layer


def embedding_row_bytes(model, batch: int) -> int:
    """Bytes of the input-embedding rows a step of ``batch`` tokens reads (0 when tied: the LM head reads it all)."""
    weight = model.embed.weight
    return 0 if weight is model.lm_head.weight else batch * weight.shape[1] * weight.element_size()


def kv_bytes(cfg, batch: int, length: int, element_size: int = 2) -> int:
    return 2 * cfg.depth * batch * cfg.kv_heads * length * cfg.head_width * element_size


class GraphedDecodeStep:
    """One decode step (``model(token [B, 1], cache=cache)``, or ``compiled(token, cache)``: a compiled step that
    has already run once, so that compiling happens outside the capture) captured as a CUDA graph on ``cache``: a
    replay reads the token from a static buffer, writes the next KV slot and advances the cache's device-side
    slot."""

    def __init__(self, model, cache, batch: int, compiled=None) -> None:
        self.cache = cache
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=DEVICE)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.token, cache=cache).logits if compiled is None else compiled(self.token, cache)
        cache.length -= 1  # capturing ran the host bookkeeping once without running the step

    def __call__(self, token):
        self.cache.reserve(*self.token.shape)  # the host part of the step; the replay advances the device part
        self.token.copy_(token)
        self.graph.replay()
        return self.logits


@torch.no_grad()
def run_zoo(model, batch: int, prompt: int, new: int, graph: bool = False, compiled=None,
            cache_len: int | None = None, count_experts: bool = False) -> dict:
    """One prefill + ``new`` decode steps (the first eager, the rest replays of a CUDA graph with ``graph``; each
    step ``compiled(token, cache)`` instead of ``model(token, cache=cache)`` with a compiled step); returns times and,
    with ``count_experts`` (the MoE layers' routing statistics on), the experts each step used per MoE layer.
    ``cache_len``: KV-cache slots (default prompt + new; a compiled step is compiled per cache length, so its warm-up
    run uses the timed runs' length)."""
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=DEVICE)
    cache = model.new_cache(batch, cache_len or prompt + new)
    layers = moe_layers(model)
    out = {}
    # a compiled step also prefills (CompiledDecodeStep.prefill: one more graph per prompt length)
    out["prefill_s"] = sync_time(lambda: model(ids, cache=cache) if compiled is None else compiled.prefill(ids, cache))
    token = torch.randint(0, cfg.vocab_size, (batch, 1), device=DEVICE)
    chosen = []  # per step: [distinct experts used per MoE layer] (device tensors, read after timing)

    def used():
        return [(layer.aux.stats.tokens_per_expert > 0).sum() for layer in layers]

    def one_step(t):
        return model(t, cache=cache).logits if compiled is None else compiled(t, cache)

    steps = new
    if graph:  # one step outside the graph (warms up the kernels; compiles a compiled step), then capture
        token = one_step(token)[:, -1:].argmax(-1)
        if count_experts:
            chosen.append(used())
        step, steps = GraphedDecodeStep(model, cache, batch, compiled), new - 1
    else:
        step = one_step

    def decode():
        nonlocal token
        for _ in range(steps):
            token = step(token)[:, -1:].argmax(-1)
            if count_experts:
                chosen.append(used())

    out["decode_s"] = sync_time(decode) * new / steps
    out["experts_per_step"] = [[int(c) for c in step] for step in chosen]
    return out


KERNEL_KINDS = (  # (kind, substrings of a kernel name), first match wins
    ("fused MoE (Triton)", ("_gemm1_kernel", "_gemm_scatter_kernel", "_route_", "_combine_kernel")),
    ("inductor fused (Triton)", ("triton_",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("GEMM / GEMV (cuBLAS, CUTLASS)", ("gemm", "gemv", "cutlass", "nvjet", "sm90_", "sm80_", "splitk",
                                       "aten::linear", "aten::addmm", "aten::mm")),
    ("norm", ("norm",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k.lower() in low for k in keys):
            return kind
    return "other (elementwise, copies, indexing)"


def profile_kernels(fn, steps: int) -> tuple[list[tuple[str, float]], float]:
    """GPU kernels (name, microseconds) that ``steps`` calls of ``fn`` ran, and the calls' wall time in
    microseconds (CUDA-synchronised). On the CPU (``--smoke``) the outermost aten ops stand in for kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        wall_us = 1e6 * (time.perf_counter() - t0)
    if DEVICE != "cuda":
        return [(e.name, e.cpu_time_total) for e in prof.events() if e.name.startswith("aten::")
                and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))], wall_us
    return [(e.name, e.device_time_total) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA], wall_us


def kernel_summary(label: str, kernels: list[tuple[str, float]], wall_us: float, steps: int, top: int = 15) -> list:
    """Markdown lines: per step, kernel count and summed kernel time against the wall time, by kind, slowest."""
    if not kernels:
        return [f"### {label}", "", "(the profiler recorded no kernels)", ""]
    total = sum(us for _, us in kernels)
    lines = [f"### {label}", "", f"Per step: {len(kernels) / steps:.0f} kernels, {total / steps:.0f} us of kernel "
             f"time, {wall_us / steps:.0f} us wall ({100 * total / wall_us:.0f}% of the wall time busy).", "",
             "| kind | kernels / step | us / step | share of kernel time |", "|---|---|---|---|"]
    kinds: dict[str, list[float]] = {}
    for name, us in kernels:
        kinds.setdefault(kernel_kind(name), []).append(us)
    for kind, times in sorted(kinds.items(), key=lambda kv: -sum(kv[1])):
        share = 100 * sum(times) / total
        lines.append(f"| {kind} | {len(times) / steps:.0f} | {sum(times) / steps:.0f} | {share:.0f}% |")
    by_name: dict[str, list[float]] = {}
    for name, us in kernels:
        by_name.setdefault(name, []).append(us)
    lines += ["", "Slowest kernels (summed over a step):", "", "| kernel | calls / step | us / step | mean us |",
              "|---|---|---|---|"]
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short}` | {len(times) / steps:.1f} | {sum(times) / steps:.1f} | "
                     f"{statistics.mean(times):.1f} |")
    return lines + [""]


@torch.no_grad()
@routing_statistics_off()
def profile_decode(name: str, model, batch: int, prompt: int, new: int, compiled, graph: bool,
                   steps: int = 8) -> list:
    """Markdown lines of :func:`kernel_summary` for ``steps`` decode steps of ``model`` at ``batch`` after a
    ``prompt``-token prefill: eager (``compiled`` None) or compiled, launched from Python or replayed from a CUDA
    graph. The cache has the timed runs' ``prompt + new`` slots (a compiled step is compiled per cache length)."""
    cfg = model.config
    cache = model.new_cache(batch, prompt + max(new, steps + 2))
    model(torch.randint(0, cfg.vocab_size, (batch, prompt), device=DEVICE), cache=cache)
    token = torch.randint(0, cfg.vocab_size, (batch, 1), device=DEVICE)

    def one_step(t):
        return model(t, cache=cache).logits if compiled is None else compiled(t, cache)

    from torch._dynamo.utils import counters

    counters.clear()
    one_step(token)  # warm-up (compiles a compiled step for this batch and cache length)
    compiled_note = []
    if compiled is not None:  # one graph and no break, or parts of the step ran eagerly
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        compiled_note = [f"dynamo: {graphs} graph(s), {breaks} graph break(s) while compiling this step"
                         + (f" ({'; '.join(list(counters['graph_break'])[:3])})" if breaks else "")
                         if graphs else "dynamo: the step was compiled earlier in this run (no new graph)", ""]
    step = GraphedDecodeStep(model, cache, batch, compiled) if graph else one_step
    step(token)
    kernels, wall_us = profile_kernels(lambda: step(token), steps)
    lines = kernel_summary(f"{name}, batch {batch}: {zoo_impl(graph, compiled)}", kernels, wall_us, steps)
    return lines[:2] + compiled_note + lines[2:]


@torch.no_grad()
@routing_statistics_off()
def profile_prefill(name: str, model, batch: int, prompt: int, steps: int = 3) -> list:
    """Markdown lines of :func:`kernel_summary` for ``steps`` prefills of ``batch`` x ``prompt`` tokens (eager, each
    into a fresh cache; one untimed prefill first)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=DEVICE)
    caches = [model.new_cache(batch, prompt) for _ in range(steps + 1)]
    model(ids, cache=caches.pop())
    kernels, wall_us = profile_kernels(lambda: model(ids, cache=caches.pop()), steps)
    return kernel_summary(f"{name}, batch {batch}: prefill of {prompt} tokens (zoo, eager)", kernels, wall_us, steps)


def zoo_impl(graph: bool, compiled) -> str:
    return "zoo" + (" + compile" if compiled is not None else "") + (" + CUDA graph" if graph else "")


# model -> {(batch, prompt, new): experts_chosen's answer}; weak keys: a later model may take a freed model's id
_EXPERTS_CHOSEN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def experts_chosen(model, batch: int, prompt: int, new: int) -> list[list[int]]:
    """Per decode step, the distinct experts each MoE layer's tokens chose, from one eager, untimed run with the
    routing statistics on (random prompts, as the timed runs: the count, 2 per layer at batch 1 with top-2, moves a
    little with the prompt at batch 32). Counted once per model, batch and length, for every row kind."""
    known = _EXPERTS_CHOSEN.setdefault(model, {})
    if (batch, prompt, new) not in known:
        known[batch, prompt, new] = run_zoo(model, batch, prompt, new, count_experts=True)["experts_per_step"]
    return known[batch, prompt, new]


def zoo_case(name: str, model, batch: int, prompt: int, new: int, repeats: int, bandwidth: float,
             graph: bool = False, compiled=None) -> dict:
    """Times of zoo prefill and decode (eager, or ``compiled`` by :func:`compiled_decode_step`; CUDA-graphed with
    ``graph``): median of ``repeats`` runs after a warm-up run (with a compiled step: the compilation)."""
    # Past dynamo's recompile limit a compiled step would run eagerly (a warning only): a row labelled "compile"
    # would time eager steps. Make that an error (an error row) instead, where this torch has the switch.
    dynamo_settings = ({"fail_on_recompile_limit_hit": True}
                       if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit") else {})
    # Both models' steps share one code object: (decode + prefill) x batch sizes x models graphs in one process, past
    # dynamo's default limit of 8 with --models phi2x4 mixtral.
    if hasattr(torch._dynamo.config, "recompile_limit"):
        dynamo_settings["recompile_limit"] = max(torch._dynamo.config.recompile_limit, 32)
    # Timed as zoo.models.generate runs a model: without the MoE layers' losses and statistics (nobody reads them
    # while generating; in session 14 they were part of every timed step, and counting experts from them added
    # per-layer kernels after every step).
    with torch._dynamo.config.patch(**dynamo_settings), routing_statistics_off():
        # warm-up (kernels, allocator; compiling a compiled step for this batch, prompt and cache length)
        run_zoo(model, batch, prompt if compiled is not None else min(prompt, 32), min(new, 4), graph, compiled,
                cache_len=prompt + new)
        runs = [run_zoo(model, batch, prompt, new, graph, compiled) for _ in range(repeats)]
    prefill = statistics.median(r["prefill_s"] for r in runs)
    decode = statistics.median(r["decode_s"] for r in runs)
    dense, experts = weight_bytes(model)
    steps = experts_chosen(model, batch, prompt, new)
    # bytes a step must read: dense weights + chosen experts + the KV cache filled so far (mean over the steps)
    step_bytes = [dense + embedding_row_bytes(model, batch) + sum(n * eb for n, (eb, _) in zip(step, experts))
                  + kv_bytes(model.config, batch, prompt + i) for i, step in enumerate(steps)]
    bound_s = sum(step_bytes) / bandwidth
    return dict(impl=zoo_impl(graph, compiled), model=name, batch=batch, prompt=prompt, new=new,
                prefill_tok_s=batch * prompt / prefill, decode_tok_s=batch * new / decode,
                decode_step_ms=1e3 * decode / new, bound_step_ms=1e3 * bound_s / new,
                bandwidth_fraction=bound_s / decode,
                mean_step_gb=statistics.mean(step_bytes) / 1e9,
                experts_per_step=statistics.mean(sum(s) for s in steps))


def hf_mixtral(zoo_model):
    """transformers MixtralForCausalLM with the zoo model's weights (mapping checked by tests/convert)."""
    import transformers

    cfg = zoo_model.config
    hf_cfg = transformers.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads, num_local_experts=cfg.moe.num_experts,
        num_experts_per_tok=cfg.moe.top_k, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False)
    with torch.device(DEVICE):
        hf = transformers.MixtralForCausalLM(hf_cfg).to(zoo_model.embed.weight.dtype).eval()
    from zoo.convert.hf_lm import convert_state_dict

    zoo_model.load_state_dict(convert_state_dict(hf_cfg.to_dict(), hf.state_dict(), cfg))
    return hf


@torch.no_grad()
def hf_case(hf, label: str, batch: int, prompt: int, new: int, repeats: int, static: bool) -> dict:
    vocab = hf.config.vocab_size
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        kw["cache_implementation"] = "static"

    def gen(n):
        ids = torch.randint(0, vocab, (batch, prompt), device=DEVICE)
        return sync_time(lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw))

    gen(2), gen(new)  # warm-up (and compilation for the static path)
    prefill = statistics.median(gen(1) for _ in range(repeats))
    total = statistics.median(gen(new + 1) for _ in range(repeats))
    decode = max(total - prefill, 1e-9)
    return dict(impl=label, model="mixtral", batch=batch, prompt=prompt, new=new,
                prefill_tok_s=batch * prompt / prefill, decode_tok_s=batch * new / decode,
                decode_step_ms=1e3 * decode / new)


def env_info() -> dict:
    import transformers

    name = torch.cuda.get_device_properties(0).name if DEVICE == "cuda" else platform.processor() or "cpu"
    return dict(device=name, torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), command="python " + " ".join(sys.argv),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


TARGETS = "batch-1 decode >= 70% of the bandwidth limit; batch-32 decode >= 50%; prefill >= 1.3x transformers' best"


def write_report(data: dict, out: Path) -> None:
    rows = data["results"]
    lines = [f"# Decoder-LM generation ({data['env']['device']}, {data['env']['date']})", "",
             f"torch {data['env']['torch']}, transformers {data['env']['transformers']}; {data['dtype']}, "
             "random weights; "
             f"copy bandwidth {data['bandwidth_gb_s']:.0f} GB/s. Command: `{data['env']['command']}`", "",
             f"Targets: {TARGETS}.", "",
             "| model | impl | batch | prompt | prefill tok/s | decode tok/s | step ms | bound ms | of limit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frac = f"{100 * r['bandwidth_fraction']:.1f}%" if "bandwidth_fraction" in r else ""
        bound = f"{r['bound_step_ms']:.2f}" if "bound_step_ms" in r else ""
        lines.append(f"| {r['model']} | {r['impl']} | {r['batch']} | {r['prompt']} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.1f} | {r['decode_step_ms']:.2f} | {bound} | {frac} |")
    for err in data.get("errors", []):
        lines.append(f"\n- failed: {err}")
    (out / "generate.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{r['model']}\n{r['impl']} bs{r['batch']}" for r in rows]
        ax.bar(range(len(rows)), [r["decode_tok_s"] for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=45, ha="right")
        ax.set_ylabel("decode tokens/s")
        ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(out / "generate.png", dpi=120)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--phi-depth", type=int, default=None, help="Phi-2x4 blocks (default: Phi-2's 32)")
    ap.add_argument("--mixtral-depth", type=int, default=4)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-static", action="store_true", help="skip transformers' static cache + torch.compile")
    ap.add_argument("--no-cuda-graph", action="store_true", help="time only eager zoo decode steps")
    ap.add_argument("--compile", action="store_true",
                    help="also time zoo decode with the step compiled by torch.compile: 'zoo + compile' and (on CUDA, "
                         "unless --no-cuda-graph) 'zoo + compile + CUDA graph'")
    ap.add_argument("--profile", action="store_true",
                    help="also write profile_<model>.md: the GPU kernels of a batch-1 decode step (eager, CUDA graph, "
                         "and with --compile the compiled step in its CUDA graph) and of a batch-1 prefill")
    ap.add_argument("--no-fuse-qkv", action="store_true",
                    help="keep separate q / k / v projections in the zoo models (default: DecoderLM.fuse_qkv_(), one "
                         "projection per block, as a server would run them)")
    ap.add_argument("--only", default=None, choices=[zoo_impl(g, c) for g in (False, True) for c in (None, True)],
                    help="time only this kind of zoo row (a time-boxed call), e.g. 'zoo + compile + CUDA graph' "
                         "(with --compile)")
    ap.add_argument("--smoke", action="store_true", help="toy widths on the CPU in fp32: checks the script runs")
    ap.add_argument("--models", nargs="+", default=["phi2x4", "mixtral"], choices=["phi2x4", "mixtral"],
                    help="which shapes to run (a time-boxed lease call can run them separately)")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/generate.py needs a CUDA GPU (--smoke runs toy shapes on the CPU)")
    fit = shrink if args.smoke else (lambda c: c)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"env": env_info(), "bandwidth_gb_s": copy_bandwidth(0.0625 if args.smoke else 2.0) / 1e9, "results": [],
            "errors": [], "dtype": str(dtype).replace("torch.", ""),
            "args": vars(args)}
    bandwidth = data["bandwidth_gb_s"] * 1e9

    def record(fn, *a, **kw):
        try:
            row = fn(*a, **kw)
            data["results"].append(row)
            print(json.dumps(row), flush=True)
        except Exception as err:  # one failed case must not lose the others
            traceback.print_exc()
            data["errors"].append(f"{fn.__name__}{a[1:4]}: {type(err).__name__}: {err}")
        (out / "generate.json").write_text(json.dumps(data, indent=1))

    # CUDA-graph rows last per model: a failed capture can leave the CUDA context unusable for what follows.
    graph_modes = (False, True) if DEVICE == "cuda" and not args.no_cuda_graph else (False,)
    # (CUDA graph, compiled) per zoo row kind; compiled rows after eager ones, graph rows after both
    zoo_modes = [(graph, comp) for graph in graph_modes for comp in ((False, True) if args.compile else (False,))
                 if args.only is None or zoo_impl(graph, comp or None) == args.only]

    def zoo_rows(name: str, model, modes, compiled) -> None:
        for graph, comp in modes:
            for b in args.batches:
                record(zoo_case, name, model, b, args.prompt, args.new, args.repeats, bandwidth, graph,
                       compiled if comp else None)

    def profiles(name: str, model, compiled) -> None:
        if not args.profile:
            return
        lines = [f"# Where a batch-1 decode step and prefill of {name} spend their time ({data['env']['device']}, "
                 f"{data['env']['date']})", "", f"torch {data['env']['torch']}; {data['dtype']}, random weights, "
                 f"prompt {args.prompt}. Kernel times from torch.profiler (CUPTI), {8} steps. Command: "
                 f"`{data['env']['command']}`", ""]
        for graph, comp in zoo_modes:
            try:
                lines += profile_decode(name, model, 1, args.prompt, args.new, compiled if comp else None, graph)
            except Exception as err:  # a profile that fails must not lose the timed rows
                traceback.print_exc()
                lines += [f"### {name}: {zoo_impl(graph, compiled if comp else None)}", "",
                          f"failed: {type(err).__name__}: {err}", ""]
            (out / f"profile_{name}.md").write_text("\n".join(lines) + "\n")
        try:  # prefill (target: 1.3x transformers' best): its kernels against its wall time
            lines += profile_prefill(name, model, 1, args.prompt)
        except Exception as err:
            traceback.print_exc()
            lines += [f"### {name}: prefill", "", f"failed: {type(err).__name__}: {err}", ""]
        (out / f"profile_{name}.md").write_text("\n".join(lines) + "\n")

    if "phi2x4" in args.models:
        with torch.device(DEVICE):
            phi = zoo.models.DecoderLM(fit(phi2x4_config(args.phi_depth))).to(dtype).eval()
        if not args.no_fuse_qkv:
            phi.fuse_qkv_()
        phi_compiled = compiled_decode_step(phi) if args.compile else None
        profiles("phi2x4", phi, phi_compiled)  # first: a time-boxed call keeps the profile (it compiles batch 1)
        zoo_rows("phi2x4", phi, zoo_modes, phi_compiled)
        del phi_compiled
        del phi
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if "mixtral" not in args.models:
        write_report(data, out)
        return
    with torch.device(DEVICE):
        mix = zoo.models.DecoderLM(fit(mixtral_config(args.mixtral_depth))).to(dtype).eval()
    hf = None
    if not args.skip_hf:
        try:
            hf = hf_mixtral(mix)
        except Exception as err:
            traceback.print_exc()
            data["errors"].append(f"transformers Mixtral: {type(err).__name__}: {err}")
    if not args.no_fuse_qkv:  # after hf_mixtral: it loads transformers' weights in the separate-projection layout
        mix.fuse_qkv_()
    # one compiled step per model: its compiled graphs (one per batch size) serve the graphed rows too
    mix_compiled = compiled_decode_step(mix) if args.compile else None
    profiles("mixtral", mix, mix_compiled)
    zoo_rows("mixtral", mix, [mode for mode in zoo_modes if not mode[0]], mix_compiled)
    for b in args.batches:
        if hf is not None:
            record(hf_case, hf, "transformers eager", b, args.prompt, args.new, args.repeats, False)
    if hf is not None and not args.skip_static and DEVICE == "cuda":
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead")
        for b in args.batches:
            record(hf_case, hf, "transformers static+compile", b, args.prompt, args.new, args.repeats, True)
    del hf
    zoo_rows("mixtral", mix, [mode for mode in zoo_modes if mode[0]], mix_compiled)
    write_report(data, out)
    print((out / "generate.md").read_text())


if __name__ == "__main__":
    main()
