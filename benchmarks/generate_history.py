#!/usr/bin/env python
"""Decode against the bandwidth limit across runs of benchmarks/generate.py: one PNG, one group of bars per model and
batch size, one bar per run (its best zoo row: the fastest decode among the zoo rows of that run), with the targets.

    R=benchmarks/results; python benchmarks/generate_history.py --out $R/generate_history.png \\
        "session 12 (eager step, CUDA graph)=$R/generate_session12.json" \\
        "session 14, compiled step=$R/generate_session14_phi2x4.json,$R/generate_session14_mixtral.json" \\
        "session 14, + per-layer KV cache=$R/generate_session14_kvcache.json" \\
        "session 15, + fused qkv, split-K, trims=$R/generate_session15_mixtral.json,$R/generate_session15_phi2x4.json"

Each run is ``LABEL=JSON[,JSON...]`` (a run split over several lease calls has several files; a later file's row
for the same model and batch replaces an earlier one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGETS = {1: 0.70, 32: 0.50}  # issue 18: decode as a fraction of the bandwidth limit, by batch size


def best_zoo_rows(paths: list[Path]) -> dict[tuple[str, int], dict]:
    """(model, batch) -> the zoo row with the highest bandwidth fraction, over ``paths`` (later files win ties)."""
    best: dict[tuple[str, int], dict] = {}
    for path in paths:
        latest: dict[tuple[str, int], dict] = {}
        for row in json.loads(path.read_text())["results"]:
            if not row["impl"].startswith("zoo") or "bandwidth_fraction" not in row:
                continue
            key = (row["model"], row["batch"])
            if key not in latest or row["bandwidth_fraction"] > latest[key]["bandwidth_fraction"]:
                latest[key] = row
        best.update(latest)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=JSON[,JSON...]")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    runs = []
    for spec in args.runs:
        label, _, files = spec.partition("=")
        if not files:
            ap.error(f"a run is LABEL=JSON[,JSON...], got {spec!r}")
        runs.append((label, best_zoo_rows([Path(f) for f in files.split(",")])))
    keys = sorted({key for _, rows in runs for key in rows})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(runs)
    for i, (label, rows) in enumerate(runs):
        xs = [k + i * width for k, key in enumerate(keys) if key in rows]
        ys = [100 * rows[key]["bandwidth_fraction"] for key in keys if key in rows]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, [f"{y:.0f}" for y in ys], fontsize=7)
    for k, (_, batch) in enumerate(keys):
        if batch in TARGETS:
            ax.hlines(100 * TARGETS[batch], k - width / 2, k + 0.8 - width / 2, colors="k", linestyles="--")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], [f"{m}\nbatch {b}" for m, b in keys])
    ax.set_ylabel("decode, % of the bandwidth limit")
    ax.set_title("Zoo decode step against the bandwidth limit (best zoo row per run; dashed: target)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
