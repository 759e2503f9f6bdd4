"""The generated model card (``README.md`` of a published folder): YAML front matter for the hub, then preset,
usage, input, settings, recipe, metrics, routing statistics and files. What differs per family (hub pipeline tag,
usage lines, citation) comes from the family's registered :class:`zoo.registry.CardInfo`."""

from __future__ import annotations

import json
from typing import Any, Mapping

from zoo.config import ConfigError, flatten
from zoo.registry import get_family, load_preset

LIBRARY_NAME = "moe-zoo"
CARD_NAME = "README.md"


def _md_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return f"`{json.dumps(v)}`"
    return str(v)


def model_card_text(config: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """The generated README.md: YAML front matter for the hub, then preset, usage, recipe, metrics, routing."""
    import yaml

    family, preset, tag = config["family"], meta.get("preset"), meta.get("tag")
    title = preset + (f".{tag}" if tag else "") if preset else f"{family} model"
    info = get_family(family).card
    task = info.pipeline_tag
    front = {"library_name": LIBRARY_NAME, "license": meta.get("license") or "apache-2.0",
             "tags": [t for t in (task, "mixture-of-experts", family, "moe-zoo") if t]}
    if task:
        front["pipeline_tag"] = task
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    desc = None
    if preset:
        try:
            desc = load_preset(preset).get("description")
        except ConfigError:
            desc = None
    lines += [f"A `{family}` model from MoE Zoo" + (f", preset `{preset}`" if preset else "")
              + (f", weights tag `{tag}`" if tag else "") + "."]
    if desc:
        lines += ["", str(desc)]
    hub_id = meta.get("hf_hub_id")
    lines += ["", "## Usage", "", "```python", "import zoo", ""]
    if preset and tag:
        lines += [f"model = zoo.create_model({preset!r}, pretrained={tag!r})"]
    if hub_id:
        lines += [f"model = zoo.create_model('hf-hub:{hub_id}')"]
    lines += ["model = zoo.create_model('local-dir:path/to/this/folder')", "model.eval()"]
    lines += list(info.usage)
    lines += ["```", ""]
    inp = meta.get("input")
    if inp:
        lines += ["## Input", ""] + [f"- {k}: {_md_value(v)}" for k, v in inp.items()] + [""]
    enc = config.get("encoder", {}) or {}
    moe = enc.get("moe", {}) or {}
    lines += ["## Model", "", "| setting | value |", "|---|---|"]
    for k in ("image_size", "patch_size", "in_chans", "num_classes", "classifier", "representation_size"):
        if k in config:
            lines.append(f"| {k} | {_md_value(config[k])} |")
    for k in ("dim", "depth", "num_heads", "mlp_dim", "moe_every", "moe_last", "moe_layers"):
        if enc.get(k) is not None:
            lines.append(f"| encoder.{k} | {_md_value(enc[k])} |")
    for k in ("num_experts", "top_k", "router", "capacity_factor", "group_size", "batch_priority"):
        if k in moe:
            lines.append(f"| moe.{k} | {_md_value(moe[k])} |")
    if "num_params" in meta:
        lines.append(f"| parameters | {meta['num_params']:,} |")
    lines += ["", "The full config is `config.json` (`zoo.create_model('local-dir:...')` rebuilds the model from it).", ""]
    if meta.get("recipe"):
        lines += ["## Training recipe", ""] + [f"- {k}: {_md_value(v)}" for k, v in flatten(meta["recipe"]).items()]
        lines += [""]
    if meta.get("metrics"):
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_md_value(v)} |" for k, v in flatten(meta["metrics"]).items()] + [""]
    routing = meta.get("routing")
    if routing:
        lines += ["## Routing statistics", ""]
        if isinstance(routing, list) and all(isinstance(r, Mapping) for r in routing):
            keys = sorted({k for r in routing for k in r}, key=lambda k: (k != "layer", k))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_md_value(r.get(k, "")) for k in keys) + " |" for r in routing]
        elif isinstance(routing, Mapping):
            lines += [f"- {k}: {_md_value(v)}" for k, v in routing.items()]
        else:
            lines += [_md_value(routing)]
        lines += [""]
    if meta.get("sha256"):
        lines += ["## Files", "", f"- `{meta.get('file', 'model.safetensors')}` sha256 `{meta['sha256']}`", ""]
    if info.citation:
        lines += ["## Citation", "", "```bibtex", info.citation.strip(), "```", ""]
    return "\n".join(lines)
