#!/usr/bin/env python
"""Peak memory of `python -m zoo.convert hf-lm` on a bf16 Hugging Face llama folder (random weights, CPU).

    python benchmarks/convert_memory.py --out benchmarks/results [--old-repo DIR --old-label REV]

Builds the folder with transformers (a dev dependency; the converter itself does not import it), then converts it
in a fresh process: one warm-up conversion (one-time lazy imports), the peak RSS (VmHWM) reset, and the measured
conversion. Reported: the peak RSS rise over the bf16 size of the model. ``--old-repo`` runs the same measurement
with another checkout of the zoo (e.g. a worktree of an older commit) for a before / after table. Linux only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEAK = r"""
import gc, sys
from zoo.convert.hf_lm import convert_hf_lm

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

convert_hf_lm(sys.argv[1], sys.argv[2] + "_warm")
gc.collect()
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS:")
model = convert_hf_lm(sys.argv[1], sys.argv[2])
print(status("VmHWM:") - base, str(next(model.parameters()).dtype))
"""


def measure(repo: Path, folder: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", PEAK, str(folder), str(out)], capture_output=True, text=True,
                          env=env, cwd=str(repo), timeout=1200)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    peak, dtype = done.stdout.split()[-2:]
    return {"peak_rss_rise_bytes": int(peak), "output_dtype": dtype}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--old-repo", type=Path, default=None)
    ap.add_argument("--old-label", default="old")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=int(2.75 * args.hidden),
                                   num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8,
                                   max_position_embeddings=512)
    work = Path(tempfile.mkdtemp())
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "hf", max_shard_size="200MB")
    del model
    bf16_bytes = 2 * params
    rows = []
    for label, repo in [("current", HERE.parent)] + ([(args.old_label, args.old_repo)] if args.old_repo else []):
        r = measure(repo, work / "hf", work / f"zoo_{label}")
        r.update(label=label, ratio_to_bf16_model=r["peak_rss_rise_bytes"] / bf16_bytes)
        rows.append(r)
        print(f"{label}: peak RSS rise {r['peak_rss_rise_bytes'] / 2**20:.0f} MiB = "
              f"{r['ratio_to_bf16_model']:.2f}x the bf16 model, output {r['output_dtype']}", flush=True)
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               machine=f"{platform.machine()} CPU, {os.cpu_count()} cores", python=platform.python_version(),
               torch=torch.__version__, transformers=transformers.__version__,
               command="python " + " ".join(sys.argv), params=params, bf16_model_bytes=bf16_bytes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convert_memory.json").write_text(json.dumps(dict(env=env, results=rows), indent=1) + "\n")
    lines = [f"# hf-lm converter peak memory ({env['date']})", "",
             f"{env['machine']}, Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}. "
             f"Command: `{env['command']}`", "",
             f"A random bf16 llama of {params / 1e6:.0f}M parameters ({bf16_bytes / 2**20:.0f} MiB in bf16), sharded "
             "safetensors; peak RSS rise of the measured conversion after a warm-up conversion in the same process.", "",
             "| code | peak RSS rise | / bf16 model size | output dtype |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['peak_rss_rise_bytes'] / 2**20:.0f} MiB | {r['ratio_to_bf16_model']:.2f}x | "
                     f"{r['output_dtype']} |")
    (args.out / "convert_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
