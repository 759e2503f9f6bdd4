"""CIFAR-10 subset: V-MoE against a dense ViT of the same active parameters, from two runs' ``metrics.csv``.

Both runs use ``configs/train/vmoe_cifar.yaml`` (4,000 train / 1,000 test images of the subset in
``../shared/data/cifar10_convnetjs_subset``, 3,500 train + 500 val); the dense run overrides
``encoder.moe_every: null`` and ``encoder.mlp_dim: 576`` (6 blocks x 576 hidden = the MoE model's 3 x 384 dense
+ 3 x 2 x 384 active expert width, top-2 of 8). The runs themselves happened on the GPU machine; this script only
renders what they logged::

    python benchmarks/cifar10_report.py --moe runs/vmoe_cifar/metrics.csv --dense runs/vmoe_cifar_dense/metrics.csv \
        --meta benchmarks/results/cifar10/meta.json --out benchmarks/results/cifar10_moe_vs_dense
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` for every non-empty cell of a Lightning CSVLogger file."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for key, value in row.items():
                if key in ("epoch", "step") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moe", type=Path, required=True)
    ap.add_argument("--dense", type=Path, required=True)
    ap.add_argument("--meta", type=Path, required=True, help="JSON: device, versions, date, commands, times, params")
    ap.add_argument("--out", type=Path, required=True, help="output stem: writes .json, .md and .png")
    args = ap.parse_args(argv)
    meta = json.loads(args.meta.read_text())
    runs = {"V-MoE (8 experts, top-2)": read_metrics(args.moe), "dense ViT": read_metrics(args.dense)}
    table = {}
    for name, m in runs.items():
        table[name] = {
            "test_accuracy_pct": round(100 * m["test/acc"][-1][1], 2),
            "test_top5_pct": round(100 * m["test/acc_top5"][-1][1], 2),
            "best_val_accuracy_pct": round(100 * max(v for _, v in m["val/acc"]), 2),
            "final_val_accuracy_pct": round(100 * m["val/acc"][-1][1], 2),
            "steps": m["val/acc"][-1][0] + 1,
        }
    result = {"meta": meta, "results": table}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, m in runs.items():
        steps, acc = zip(*m["val/acc"])
        ax.plot(steps, [100 * a for a in acc], marker="o", label=f"{name}: test {table[name]['test_accuracy_pct']:.1f} %")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("CIFAR-10 subset: V-MoE vs dense ViT\n(same active parameters, 3,500 training images)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)

    lines = [
        "# CIFAR-10 subset: V-MoE vs a dense ViT of the same active parameters",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}, lightning {meta['lightning']}; {meta['date']}; "
        f"code at {meta['commit']}.",
        "",
        "| model | params (total / active) | test acc (%) | test top-5 (%) | best val acc (%) | steps | train wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        p = meta["params"][name]
        lines.append(f"| {name} | {p['total']:,} / {p['active']:,} | {row['test_accuracy_pct']:.1f} | "
                     f"{row['test_top5_pct']:.1f} | {row['best_val_accuracy_pct']:.1f} | {row['steps']} | "
                     f"{meta['wall_time_s'][name]} |")
    lines += ["", "Commands (on the GPU machine, `ZOO_DATA` pointing at a copy of `../shared/data`):", ""]
    lines += [f"    {c}" for c in meta["commands"]]
    lines += ["", meta["reading"], "", f"![validation curves]({args.out.with_suffix('.png').name})", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
