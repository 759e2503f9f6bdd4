"""Combine LIMoE runs (entropy losses on / off) into ``benchmarks/results/limoe_<name>.json`` + ``.md``.

    python benchmarks/limoe_report.py mnist  --on RUN_ON.json --off RUN_OFF.json
    python benchmarks/limoe_report.py flickr8k --on RUN_ON.json --off RUN_OFF.json

Each input is the ``--out`` JSON of ``benchmarks/limoe_run.py`` (command, machine, versions, date, wall time,
test metrics, per-layer routing by modality). The report states the targets of issue 6 and whether they are met.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _fmt(x: Any, nd: int = 2) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def routing_table(run: dict) -> list[str]:
    lines = ["| layer | modality | effective experts (of E) | token entropy (nats) | global entropy (nats) | usage per expert |",
             "|---|---|---|---|---|---|"]
    for layer, v in (run.get("test_routing") or {}).items():
        for mod in ("image", "text"):
            m = v[mod]
            usage = " ".join(f"{u:.2f}" for u in m["usage"])
            lines.append(f"| {layer} | {mod} | {m['effective_experts']:.2f} | {m['token_entropy']:.3f} | "
                         f"{m['global_entropy']:.3f} | {usage} |")
    lines += ["", "| layer | JS(image usage, text usage) bits | image-only experts | text-only experts | shared | "
                  "image share per expert (1 = image only) |", "|---|---|---|---|---|---|"]
    for layer, v in (run.get("test_routing") or {}).items():
        share = " ".join("-" if s is None else f"{s:.2f}" for s in v["image_share_per_expert"])
        lines.append(f"| {layer} | {v['js_divergence_bits']:.3f} | {v['image_only_experts']} | "
                     f"{v['text_only_experts']} | {v['shared_experts']} | {share} |")
    return lines


def specialisation_verdict(run: dict) -> str:
    r = run.get("test_routing") or {}
    if not r:
        return "no routing statistics"
    img = sum(v["image_only_experts"] for v in r.values())
    txt = sum(v["text_only_experts"] for v in r.values())
    js = max(v["js_divergence_bits"] for v in r.values())
    if img + txt == 0:
        return f"no modality-specific experts (image share never >= 0.9 or <= 0.1; max JS {js:.3f} bits)"
    return (f"yes: {img} image-only and {txt} text-only experts over {len(r)} MoE layers "
            f"(image share >= 0.9 / <= 0.1 among used experts; max per-layer JS divergence {js:.3f} bits)")


def summary_from_json(routing: dict):
    """A :class:`ModalityRoutingSummary` from ``as_dict()`` output (counts = usage x tokens; for plots)."""
    import torch

    from zoo.tasks.contrastive import ModalityRoutingSummary

    if not routing:
        return None
    names = list(routing)
    mods = ("image", "text")
    usage = torch.tensor([[routing[n][m]["usage"] for m in mods] for n in names], dtype=torch.float64)
    tokens = torch.tensor([[routing[n][m]["tokens"] for m in mods] for n in names], dtype=torch.float64)
    ent = torch.tensor([[routing[n][m]["token_entropy"] for m in mods] for n in names], dtype=torch.float64)
    return ModalityRoutingSummary(names, usage * tokens.unsqueeze(-1), usage, ent, tokens)


def _seed(run: dict) -> str:
    """The run's seed_everything: recorded, else from the command line, else the recipe's (0)."""
    if run.get("seed") is not None:
        return str(run["seed"])
    parts = run.get("command", "").replace("=", " ").split()
    return parts[parts.index("--seed_everything") + 1] if "--seed_everything" in parts else "0"


# Metrics this report shows in percent. Run JSONs written by limoe_run.py since 2026-12-03 say
# "metric_unit": "fraction" (the unit every task logs); older recorded runs have no such key and are in percent.
PERCENT_METRICS = ("zero_shot_acc", "zero_shot_acc_top5", *(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)))


def in_percent(run: dict) -> dict:
    """``run`` with its val / test accuracies and recalls in percent, whichever unit it was recorded in."""
    unit = run.get("metric_unit", "percent")
    if unit == "percent":
        return run
    if unit != "fraction":
        raise ValueError(f"unknown metric_unit {unit!r} in a run JSON; expected 'fraction' or 'percent'")
    out = dict(run, metric_unit="percent")
    for split in ("val", "test"):
        if run.get(split):
            out[split] = {k: (100.0 * v if k in PERCENT_METRICS and v is not None else v) for k, v in run[split].items()}
    return out


def _mean_row(runs: list[dict], section: str, keys: list[str]) -> dict[str, float]:
    out = {}
    for k in keys:
        vals = [(r.get(section) or {}).get(k) for r in runs]
        vals = [v for v in vals if v is not None]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=["mnist", "flickr8k"])
    p.add_argument("--on", required=True, nargs="+", help="run JSON(s) with the entropy losses on (one per seed)")
    p.add_argument("--off", required=True, nargs="+", help="run JSON(s) with the entropy losses off (one per seed)")
    p.add_argument("--notes", default="", help="extra markdown appended to the report")
    a = p.parse_args()
    on = [in_percent(json.loads(Path(f).read_text())) for f in a.on]
    off = [in_percent(json.loads(Path(f).read_text())) for f in a.off]
    runs: dict[str, dict] = {}
    for tag, group in (("entropy_on", on), ("entropy_off", off)):
        for i, r in enumerate(group):
            runs[tag if i == 0 else f"{tag}_run{i + 1}"] = r
    out: dict[str, Any] = {"benchmark": f"limoe_{a.name}", "runs": runs}
    md = [f"# LIMoE on {'MNIST with class-name captions' if a.name == 'mnist' else 'the Flickr8k 1k subset'}", ""]
    if a.name == "mnist":
        target = 90.0
        head = ["zero_shot_acc", "zero_shot_acc_top5"]
        acc_on = _mean_row(on, "test", head).get("zero_shot_acc")
        acc_off = _mean_row(off, "test", head).get("zero_shot_acc")
        out["target"] = "zero-shot top-1 on the MNIST test set with held-out templates >= 90 %"
        out["met"] = bool(acc_on is not None and all((r.get("test") or {}).get("zero_shot_acc", 0) >= target for r in on))
        md += [f"Target: {out['target']} -> **{'met' if out['met'] else 'NOT met'}** "
               f"(entropy losses on: {_fmt(acc_on)} %, off: {_fmt(acc_off)} %).", ""]
    else:
        from zoo.tasks.contrastive import retrieval_chance

        chance = {k: 100.0 * v for k, v in retrieval_chance(200, 5).items()}  # percent, as the runs here
        out["chance"] = chance
        head = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
        mean_on = _mean_row(on, "test", head)
        per_run = [all((r.get("test") or {}).get(k, 0) >= 3 * chance[k] for k in ("i2t_R@10", "t2i_R@10")) for r in on]
        ok = all(mean_on.get(k, 0) >= 3 * chance[k] for k in ("i2t_R@10", "t2i_R@10"))
        out["target"] = "test recall@10 (both directions) >= 3x chance; entropy losses change per-modality expert usage"
        out["met_recall_mean"] = bool(ok)
        out["met_recall_per_run"] = per_run
        md += [f"Target: test recall@10 >= 3x chance (chance: i2t {chance['i2t_R@10']:.2f} %, t2i "
               f"{chance['t2i_R@10']:.2f} %, so >= {3 * chance['i2t_R@10']:.1f} / {3 * chance['t2i_R@10']:.1f} %) -> "
               f"**{'met' if ok else 'NOT met'}** with the entropy losses on, mean of {len(on)} run(s): "
               f"i2t {_fmt(mean_on.get('i2t_R@10'), 1)} % ({mean_on.get('i2t_R@10', 0) / chance['i2t_R@10']:.2f}x "
               f"chance), t2i {_fmt(mean_on.get('t2i_R@10'), 1)} % "
               f"({mean_on.get('t2i_R@10', 0) / chance['t2i_R@10']:.2f}x chance).", ""]
    rm = ["effective_experts_image", "effective_experts_text", "token_entropy_image", "token_entropy_text",
          "js_divergence_bits", "image_only_experts", "text_only_experts"]
    md += ["| run | seed | " + " | ".join(head) + " | " + " | ".join(rm) + " | wall time (s) |",
           "|" + "---|" * (len(head) + len(rm) + 3)]
    for k, r in runs.items():
        t, m = r.get("test") or {}, r.get("test_routing_means") or {}
        md.append(f"| {k} | {_seed(r)} | " + " | ".join(_fmt(t.get(h)) for h in head) + " | "
                  + " | ".join(_fmt(m.get(x), 3) for x in rm) + f" | {_fmt(r.get('wall_time_s'), 0)} |")
    if len(on) > 1 or len(off) > 1:
        for tag, group in (("mean on", on), ("mean off", off)):
            t, m = _mean_row(group, "test", head), _mean_row(group, "test_routing_means", rm)
            md.append(f"| **{tag}** ({len(group)}) | | " + " | ".join(_fmt(t.get(h)) for h in head) + " | "
                      + " | ".join(_fmt(m.get(x), 3) for x in rm) + " | |")
            out[tag.replace(" ", "_")] = {"test": t, "test_routing_means": m}
    md += ["", "Routing columns are layer means over the test pass (`zoo.tasks.contrastive.ModalityRoutingSummary`): "
           "effective experts = exp(entropy of the modality's top-1 assignment distribution); token entropy = mean "
           "per-token router entropy (the LIMoE local entropy); JS = Jensen-Shannon divergence between the image and "
           "text expert-usage distributions (0 = identical, 1 bit = disjoint); image-only / text-only experts = "
           "experts whose modality-balanced load is >= 90 % image / text.", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for k in ("entropy_on", "entropy_off"):  # plots next to the report (runs/ is not versioned), from the JSON
        r = runs[k]
        summary = summary_from_json(r.get("test_routing") or {})
        if summary is not None:
            from zoo.tasks.contrastive import write_modality_routing_plots

            paths = write_modality_routing_plots(summary, RESULTS, prefix=f"limoe_{a.name}_{k}",
                                                 title=f"{r['model_preset']} {k} (test)")
            r["plots"] = [str(p.relative_to(REPO)) for p in paths]
    for k, r in runs.items():
        md += [f"## {k}", "", f"Experts specialise by modality? {specialisation_verdict(r)}", "",
               f"- command: `{r['command']}`", f"- date: {r['date']}", f"- machine: {r['machine']}",
               f"- versions: {', '.join(f'{a}={b}' for a, b in r['versions'].items())}",
               f"- wall time: {r['wall_time_s']} s (training {r['train_wall_time_s']} s), {r['global_step']} steps",
               f"- model: `{r['model_preset']}` + overrides `{json.dumps(r['model_overrides'])}`, "
               f"{r['num_params'] / 1e6:.2f} M parameters"]
        if k in ("entropy_on", "entropy_off"):
            md.append(f"- plots: {', '.join('`' + p + '`' for p in r.get('plots', []))}")
        md += [""] + routing_table(r) + [""]
        out.setdefault("specialisation", {})[k] = specialisation_verdict(r)
    if a.notes:
        md += ["## Notes", "", a.notes, ""]
    (RESULTS / f"limoe_{a.name}.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"limoe_{a.name}.md").write_text("\n".join(md))
    print(RESULTS / f"limoe_{a.name}.md")


if __name__ == "__main__":
    main()
