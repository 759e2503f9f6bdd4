#!/usr/bin/env python
"""CPU data-loader throughput of a training recipe's datamodule, per loader worker.

    python benchmarks/loader_throughput.py configs/train/uni_moe_stage1.yaml --label after \
        --out benchmarks/results          # merges into loader_throughput.{json,md}

Builds the recipe's ``data`` section (``num_train`` overridable), then times training batches two ways, each as
``--repeats`` runs of ``--batches`` batches after ``--warmup`` batches, reporting the median:

- ``in_process``: ``num_workers=0``, torch at one thread (a loader worker's setting): the pure cost of
  ``__getitem__`` x batch + collate;
- ``one_worker``: ``num_workers=1``, batches/s seen by the main process: adds the worker -> main transfer (shared
  memory) and is what one worker delivers to a training loop.

Results are keyed by ``--label`` (e.g. ``before`` / ``after`` a change) so one file holds both.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import yaml  # noqa: E402


def build_datamodule(config: Path, num_train: int | None, num_workers: int):
    data = yaml.safe_load(config.read_text())["data"]
    module, _, name = data["class_path"].rpartition(".")
    args = dict(data.get("init_args", {}))
    if num_train is not None:
        args["num_train"] = num_train
    args["num_workers"] = num_workers
    args["persistent_workers"] = False
    dm = getattr(importlib.import_module(module), name)(**args)
    dm.setup("fit")
    return dm


def time_batches(dm, warmup: int, batches: int, repeats: int) -> list[float]:
    """Seconds per batch of each repeat (a fresh loader iterator per repeat; warm-up batches untimed)."""
    out = []
    for _ in range(repeats):
        it = iter(dm.train_dataloader())
        for _ in range(warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        out.append((time.perf_counter() - start) / batches)
        del it
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--label", default="current")
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="in_process,one_worker")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=None, help="folder for loader_throughput.{json,md}")
    args = parser.parse_args()

    torch.set_num_threads(1)  # as in a DataLoader worker
    record = {"config": str(args.config), "num_train": args.num_train, "warmup": args.warmup,
              "batches": args.batches, "repeats": args.repeats, "note": args.note,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
              "python": platform.python_version(), "torch": torch.__version__}
    for mode in args.modes.split(","):
        workers = {"in_process": 0, "one_worker": 1}[mode]
        dm = build_datamodule(args.config, args.num_train, workers)
        record["batch_size"] = dm.batch_size
        per_batch = time_batches(dm, args.warmup, args.batches, args.repeats)
        med = statistics.median(per_batch)
        record[mode] = {"s_per_batch": [round(t, 4) for t in per_batch], "median_s_per_batch": round(med, 4),
                        "batches_per_s": round(1.0 / med, 3)}
        print(f"{mode}: median {med:.3f} s/batch = {1 / med:.2f} batches/s per worker "
              f"(runs: {', '.join(f'{t:.3f}' for t in per_batch)})", flush=True)
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "loader_throughput.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault(str(args.config), {})[args.label] = record
    path.write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, args.out / "loader_throughput.md")


def write_markdown(results: dict, path: Path) -> None:
    lines = ["# Data-loader throughput per worker (CPU)", "",
             "`python benchmarks/loader_throughput.py CONFIG --label LABEL --out benchmarks/results`: median seconds "
             "per training batch over repeated runs (torch at 1 thread). `in_process`: num_workers=0 (getitem + "
             "collate); `one_worker`: num_workers=1 as seen by the main process (adds the shared-memory transfer). "
             "Shared 2-core machine: expect +-20% noise between runs.", ""]
    for config, by_label in results.items():
        lines += [f"## {config}", "", "| label | date | machine | batch | in_process s/batch | in_process batches/s "
                  "| one_worker s/batch | one_worker batches/s | note |", "|---|---|---|---|---|---|---|---|---|"]
        for label, r in by_label.items():
            cells = []
            for mode in ("in_process", "one_worker"):
                m = r.get(mode)
                cells += [f"{m['median_s_per_batch']:.3f}", f"{m['batches_per_s']:.2f}"] if m else ["-", "-"]
            lines.append(f"| {label} | {r['date']} | {r['machine']} | {r.get('batch_size', '-')} | "
                         + " | ".join(cells) + f" | {r.get('note', '')} |")
        for base in [b for b in by_label if b.startswith("before")]:
            for label in [k for k in by_label if not k.startswith("before")]:
                for mode in ("in_process", "one_worker"):
                    if mode in by_label[label] and mode in by_label[base]:
                        ratio = (by_label[base][mode]["median_s_per_batch"]
                                 / by_label[label][mode]["median_s_per_batch"])
                        lines.append(f"- {mode}: {label} is {ratio:.2f}x the batches/s of {base}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
