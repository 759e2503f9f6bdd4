#!/usr/bin/env python
"""The stage-III step across lease machines: one PNG, one group of bars per run of benchmarks/moe_llava_step.py
(the zoo, the step with cost-free MoE layers, the official algorithm), each group labelled with zoo / official.

    R=benchmarks/results; S=$R/moe_llava_step_session16.json
    python benchmarks/moe_llava_step_plot.py --out $R/moe_llava_step_session16.png "call 3=$S:H" \\
        "call 3\\n--frozen-bf16=$S:F" "call 4=$S:H2" "call 5=$S:H3" "call 5\\n--compile=$S:K" \\
        "call 6\\n--compile=$S:K3" "call 3\\nbatch 8=$S:H8"

(``\\n`` in a label breaks the line.)

Each run is ``LABEL=JSON[:RUN[+RUN...]]``: a report of moe_llava_step.py, or a session file holding several
(``{"runs": [{"run": NAME, "results": [...]}, ...]}``) with the names of the runs to merge (rows of later runs
replace earlier ones for the same implementation; merge only runs of one lease call, i.e. one machine).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BARS = (("zoo", "zoo"), ("free", "MoE layers free (ceiling)"), ("deepspeed", "official algorithm"))


def step_rows(spec: str) -> dict[str, dict]:
    """impl -> result row for ``JSON[:RUN[+RUN...]]``."""
    path, _, names = spec.partition(":")
    data = json.loads(Path(path).read_text())
    if "runs" in data:
        if not names:
            raise ValueError(f"{path} holds several runs: name them as {path}:RUN[+RUN...]")
        by_name = {r["run"]: r for r in data["runs"]}
        unknown = [n for n in names.split("+") if n not in by_name]
        if unknown:
            raise ValueError(f"{path} has no run {unknown}; it has {sorted(by_name)}")
        reports = [by_name[n] for n in names.split("+")]
    else:
        reports = [data]
    rows: dict[str, dict] = {}
    for report in reports:
        rows.update({r["impl"]: r for r in report["results"] if "error" not in r})
    return rows


def plot(runs: list[tuple[str, dict[str, dict]]], out: Path, target: float = 2.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(runs) + 2), 4.6))
    width = 0.26
    for j, (impl, name) in enumerate(BARS):
        xs = [i + (j - 1) * width for i, (_, rows) in enumerate(runs) if impl in rows]
        ys = [rows[impl]["step_ms"] for _, rows in runs if impl in rows]
        ax.bar(xs, ys, width, label=name)
    for i, (_, rows) in enumerate(runs):
        if {"zoo", "deepspeed"} <= set(rows):
            ratio = rows["deepspeed"]["step_ms"] / rows["zoo"]["step_ms"]
            top = max(r["step_ms"] for r in rows.values())
            # one more digit where rounding would reach the target: 1.998x must not read as 2.00x
            shown = f"{ratio:.3f}x" if ratio < target <= round(ratio, 2) else f"{ratio:.2f}x"
            ax.text(i, top * 1.03, shown, ha="center", fontsize=9,
                    color="tab:green" if ratio >= target else "tab:red")
    ax.set_xticks(range(len(runs)), [label for label, _ in runs], fontsize=8)
    ax.set_ylabel("training step time (ms, median)")
    ax.set_title(f"MoE-LLaVA stage-III step, H200 leases: zoo / official tokens/s above each run (target "
                 f"{target:.0f}x)\nPhi-2x4 shape cut to 8 blocks, batch 4 unless noted; zoo checkpoints all but its MoE "
                 "layers, the official algorithm whole blocks (as MoE-LLaVA trains)", fontsize=10)
    ax.set_ylim(0, 1.15 * max(r["step_ms"] for _, rows in runs for r in rows.values()))
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="LABEL=JSON[:RUN[+RUN...]]")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    runs = []
    for run in args.runs:
        label, sep, spec = run.partition("=")
        if not sep:
            ap.error(f"{run!r}: give LABEL=JSON[:RUN[+RUN...]]")
        runs.append((label.replace("\\n", "\n"), step_rows(spec)))
    plot(runs, args.out)


if __name__ == "__main__":
    main()
