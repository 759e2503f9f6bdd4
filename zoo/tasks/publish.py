"""Publishing: a Lightning training checkpoint -> a published weights folder, a ``weights/manifest.json`` entry and
the preset's ``pretrained.<tag>`` section; checking every manifest entry. This is the tasks' side of the hub (it
reads task checkpoints and builds datamodules); the library (:mod:`zoo.hub`, :mod:`zoo.factory`) never imports it.

CLI: ``python -m zoo.tasks.publish export --checkpoint CKPT --preset NAME --tag TAG --out weights/NAME.TAG
--metrics metrics.json`` publishes a checkpoint; ``python -m zoo.tasks.publish push DIR org/repo`` uploads a
folder; ``python -m zoo.tasks.publish verify`` checks every manifest entry; ``... list`` lists the tags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from zoo.checkpoint import load_state_dict_checked
from zoo.config import ConfigError, flatten, merge, to_dict
from zoo.errors import CorruptCheckpointError, PretrainedError, WeightsNotFoundError
from zoo.factory import create_model
from zoo.tasks.datamodule_factory import build_datamodule
from zoo.hub import WEIGHTS_NAME, PathLike, dumps_json, json_safe, save_pretrained, sha256_file, upload_folder
from zoo.moe import set_eval_overrides
from zoo.registry import (build_model, family_of_model, get_family, list_pretrained, load_preset, model_config,
                          preset_file, pretrained_tags, weights_dir)

logger = logging.getLogger("zoo.tasks.publish")

MANIFEST_NAME = "manifest.json"
DEFAULT_HUB_ORG = os.environ.get("ZOO_HUB_ORG", "moe-zoo")


def manifest_path() -> Path:
    return weights_dir() / MANIFEST_NAME


def read_manifest(path: Optional[PathLike] = None) -> dict[str, Any]:
    path = Path(path) if path else manifest_path()
    if not path.is_file():
        return {"version": 1, "weights": []}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("weights"), list):
        raise CorruptCheckpointError(f"{path}: expected {{'version': 1, 'weights': [...]}}")
    return data


def update_manifest(entry: Mapping[str, Any], path: Optional[PathLike] = None) -> Path:
    """Insert or replace the entry with the same (name, tag); entries stay sorted."""
    path = Path(path) if path else manifest_path()
    data = read_manifest(path)
    rows = [w for w in data["weights"] if (w.get("name"), w.get("tag")) != (entry["name"], entry["tag"])]
    rows.append(dict(entry))
    data["weights"] = sorted(rows, key=lambda w: (w["name"], w["tag"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_json(data))
    return path


def _top_level_blocks(text: str) -> list[tuple[str, int, int]]:
    """(key, start, end) character spans of the top-level keys of a YAML mapping file."""
    lines = text.splitlines(keepends=True)
    starts = []
    pos = 0
    for line in lines:
        if line and not line[0].isspace() and not line.startswith("#") and ":" in line and line.strip() != "---":
            starts.append((line.split(":", 1)[0].strip(), pos))
        pos += len(line)
    return [(k, s, starts[i + 1][1] if i + 1 < len(starts) else len(text)) for i, (k, s) in enumerate(starts)]


def write_preset_tag(name: str, tag: str, entry: Mapping[str, Any], *, make_default: Optional[bool] = None) -> Path:
    """Set ``pretrained.<tag>`` in preset ``name``'s YAML, rewriting only the ``pretrained:`` block (the
    ``config:`` text is left byte for byte as it was)."""
    import yaml

    path = preset_file(name)
    text = path.read_text()
    tags = dict(load_preset(name).get("pretrained") or {})
    new = {k: v for k, v in dict(entry).items() if v is not None}
    if make_default is None:
        make_default = not any(e.get("default") for t, e in tags.items() if t != tag)
    if make_default:
        for t in tags:
            if t != tag and tags[t].get("default"):
                tags[t] = {**tags[t], "default": False}
    new["default"] = bool(make_default)
    tags[tag] = new
    block = yaml.safe_dump({"pretrained": json_safe(tags)}, sort_keys=False, width=110, default_flow_style=None)
    spans = _top_level_blocks(text)
    old = [(s, e) for k, s, e in spans if k == "pretrained"]
    if old:
        s, e = old[0]
        text = text[:s] + block + text[e:]
    else:
        text = text + ("" if text.endswith("\n") else "\n") + block
    check = yaml.safe_load(text)
    before = yaml.safe_load(path.read_text())
    if check.get("config") != before.get("config") or check.get("family") != before.get("family"):
        raise RuntimeError(f"internal error: rewriting {path} would change its config; left untouched")
    path.write_text(text)
    return path


def _lightning_state_dict(ckpt: Any, where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(model state dict, extra info) of a Lightning checkpoint of ``ImageClassificationTask`` (model in
    ``.model``), or of a plain state dict."""
    if not isinstance(ckpt, Mapping):
        raise CorruptCheckpointError(f"{where}: expected a checkpoint dict, found {type(ckpt).__name__}")
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, Mapping) or not sd:
        raise CorruptCheckpointError(f"{where}: no 'state_dict' in the checkpoint (keys: {sorted(ckpt)[:10]})")
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    prefixed = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    info = {k: ckpt[k] for k in ("epoch", "global_step", "hyper_parameters", "datamodule_hyper_parameters")
            if k in ckpt}
    return (prefixed or tensors), info


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--override expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _config_from_hparams(hparams: Any, preset: str) -> dict[str, Any]:
    """Config overrides recorded in ``ImageClassificationTask``'s hyper-parameters: ``model_overrides`` and the data
    geometry (``num_classes`` / ``in_chans`` / ``image_size``). Eval-time routing is applied to the built model by
    :func:`_apply_eval_routing` (it lives in the model's config, which the exported config.json then holds)."""
    if not isinstance(hparams, Mapping):
        return {}
    trained = hparams.get("model")
    if isinstance(trained, str) and trained != preset:
        raise ConfigError(f"the checkpoint was trained with model {trained!r}, not --preset {preset!r}")
    out: dict[str, Any] = {}
    for key in ("model_overrides", "overrides", "model_kwargs"):
        if isinstance(hparams.get(key), Mapping):
            out = merge(out, hparams[key])
    for key in ("num_classes", "in_chans", "image_size"):
        if hparams.get(key) is not None:
            out[key] = hparams[key]
    cfg = hparams.get("model_config")
    if is_dataclass(cfg):
        cfg = to_dict(cfg)
    if isinstance(cfg, Mapping):
        out = merge(out, cfg)
    return out


def _apply_eval_routing(model: nn.Module, hparams: Any) -> None:
    """The task's eval-time routing arguments (``eval_capacity_factor``, ``eval_top_k``, ``eval_dropless``) set on
    the model the way the task sets them (:func:`zoo.moe.set_eval_overrides`, which updates ``model.config``), so the
    exported config evaluates exactly as the checkpoint did."""
    if isinstance(hparams, Mapping):
        set_eval_overrides(model, capacity_factor=hparams.get("eval_capacity_factor"),
                           top_k=hparams.get("eval_top_k"), dropless=hparams.get("eval_dropless"))


def minimal_overrides(preset: str, config: Any) -> dict[str, Any]:
    """Dotted-key overrides that turn preset ``preset``'s config into ``config`` (empty if they are equal)."""
    base, want = flatten(to_dict(model_config(preset))), flatten(to_dict(config))
    return {k: v for k, v in want.items() if base.get(k, object()) != v}


def _datamodule_input(data: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """mean / std of the recorded datamodule class (``zoo.data`` modules carry them as class attributes)."""
    if not data or not data.get("class_path"):
        return {}
    import importlib

    module, _, name = str(data["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return {}
    out = {}
    for key in ("mean", "std"):
        value = getattr(cls, key, None)
        if isinstance(value, (list, tuple)):
            out[key] = [float(v) for v in value]
    return out


def split_eval_metrics(metrics: Optional[Mapping[str, Any]]) -> tuple[dict[str, Any], Optional[list[dict]]]:
    """(scalar metrics, routing rows for the card) from ``eval.py``'s JSON, a Lightning test dict, or a list with
    one of those. Paths and plot lists are dropped."""
    if isinstance(metrics, list):
        metrics = metrics[0] if len(metrics) == 1 and isinstance(metrics[0], Mapping) else {"values": metrics}
    metrics = dict(metrics or {})
    routing = metrics.pop("routing", None)
    layers = metrics.pop("layers", None)
    if routing is None and isinstance(layers, Mapping):
        routing = []
        for name, row in layers.items():
            row = dict(row or {})
            routing.append({"layer": name, "dropped_fraction": row.get("dropped_fraction"),
                            "expert_load": [round(float(x), 4) for x in row.get("tokens_per_expert_share") or []],
                            "capacity": row.get("capacity")})
    for key in ("checkpoint", "plots", "datamodule", "model"):
        metrics.pop(key, None)
    scalars = {k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float, str, bool))}
    return {k: v for k, v in scalars.items() if v is not None}, routing


@torch.no_grad()
def prediction_check(model: nn.Module, data: Mapping[str, Any], max_images: int = 256) -> dict[str, Any]:
    """Predictions on the first ``max_images`` test images (recorded datamodule, batch size and threads, fp32, CPU):
    a fast reproducibility check stored with the weights, next to the full-split metrics."""
    fam = family_of_model(model)
    if fam is None or fam.predict is None:
        raise ValueError(f"{type(model).__name__}: its family registers no predict() for a prediction check")
    dm = build_datamodule(data["class_path"], data.get("init_args"))
    dm.setup("test")
    threads = torch.get_num_threads()
    if data.get("num_threads"):
        torch.set_num_threads(int(data["num_threads"]))
    preds: list[int] = []
    correct = 0
    try:
        model.eval()
        for images, labels in dm.test_dataloader():
            p = fam.predict(model, images)
            preds += p.tolist()
            correct += int((p == labels).sum())
            if len(preds) >= max_images:
                break
    finally:
        torch.set_num_threads(threads)
    return {"split": "test", "first_n": len(preds), "correct": correct, "predictions": preds}


def export_checkpoint(checkpoint: PathLike, preset: str, tag: str, out: PathLike, *,
                      metrics: Optional[Mapping[str, Any]] = None, recipe: Optional[Mapping[str, Any]] = None,
                      routing: Optional[Any] = None, hf_hub_id: Optional[str] = None,
                      license: str = "apache-2.0", input: Optional[Mapping[str, Any]] = None,
                      overrides: Optional[Mapping[str, Any]] = None, dtype: Optional[torch.dtype] = None,
                      make_default: Optional[bool] = None, update_registry: bool = True,
                      manifest: Optional[PathLike] = None) -> dict[str, Any]:
    """Lightning checkpoint -> published folder ``out`` (+ manifest entry + preset ``pretrained.<tag>``)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise WeightsNotFoundError(f"checkpoint {checkpoint} not found")
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - Lightning hparams may hold objects: the project's own file, trusted
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    sd, info = _lightning_state_dict(ckpt, str(checkpoint))
    hparams = info.get("hyper_parameters") or {}
    ov = merge(_config_from_hparams(hparams, preset), dict(overrides or {}))
    family = get_family(load_preset(preset)["family"])
    model = build_model(family.name, model_config(preset, **ov))
    _apply_eval_routing(model, hparams)
    load_state_dict_checked(model, sd, source=str(checkpoint))
    ov = minimal_overrides(preset, model.config)
    given = dict(recipe or {})
    recipe = {k: v for k, v in json_safe(hparams).items()
              if k != "model_config" and not k.startswith("_") and v is not None}
    recipe.update(given)
    for k in ("epoch", "global_step"):
        if k in info:
            recipe.setdefault(k, int(info[k]))
    data = None
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("zoo_datamodule"), Mapping):
        data = {k: v for k, v in json_safe(ckpt["zoo_datamodule"]).items() if k in ("class_path", "init_args")}
        trained = ckpt.get("zoo_trainer") or {}
        if trained.get("num_threads"):
            data["num_threads"] = int(trained["num_threads"])
    input = dict(input or {})
    if family.input_size is not None:
        input.setdefault("size", family.input_size(model.config))
    for k, v in _datamodule_input(data).items():
        input.setdefault(k, v)
    if dtype is not None and dtype != torch.float32:
        # round the weights to the stored precision now, so the check below sees exactly what loading gives
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.to(dtype).to(t.dtype))
    check = None
    if data and family.predict is not None:
        try:
            check = prediction_check(model, data)
        except Exception as err:  # noqa: BLE001 - data not available here: the check is optional
            logger.warning("no prediction check recorded (%s: %s)", type(err).__name__, err)
    metrics, eval_routing = split_eval_metrics(metrics)
    routing = routing if routing is not None else eval_routing
    hf_hub_id = hf_hub_id or f"{DEFAULT_HUB_ORG}/{preset}.{tag}"
    out = Path(out)
    save_pretrained(model, out, preset=preset, tag=tag, metrics=metrics, recipe=recipe, routing=routing,
                    license=license, input=input, hf_hub_id=hf_hub_id, dtype=dtype)
    weights = out / WEIGHTS_NAME
    try:
        local_dir = out.resolve().relative_to(weights_dir().resolve()).as_posix()
    except ValueError:
        local_dir = None
        logger.warning("%s is not inside %s: the registry entry will only point at the hub", out, weights_dir())
    entry = {"hf_hub_id": hf_hub_id, "file": WEIGHTS_NAME, "sha256": sha256_file(weights),
             "size": weights.stat().st_size, "local_dir": local_dir, "license": license,
             "input": json_safe(input), "metrics": json_safe(metrics) or None, "data": data,
             "recipe": json_safe(recipe) or None, "overrides": json_safe(ov) or None, "check": check,
             "weights_dtype": str(dtype).replace("torch.", "") if dtype not in (None, torch.float32) else None}
    entry = {k: v for k, v in entry.items() if v is not None}
    if update_registry:
        update_manifest({"name": preset, "tag": tag, **entry}, manifest)
        write_preset_tag(preset, tag, {k: v for k, v in entry.items() if k != "check"}, make_default=make_default)
    return entry


def verify_manifest(manifest: Optional[PathLike] = None, *, load: bool = True) -> list[str]:
    """Check every manifest entry: local file present with the recorded sha256, preset entry identical, loads."""
    problems = []
    for w in read_manifest(manifest)["weights"]:
        name, tag = w["name"], w["tag"]
        try:
            entry = pretrained_tags(name).get(tag)
            if entry is None:
                problems.append(f"{name}.{tag}: in the manifest but not in the preset's pretrained section")
                continue
            if entry.get("sha256") != w.get("sha256"):
                problems.append(f"{name}.{tag}: sha256 differs between manifest and preset")
            if load:
                create_model(name, pretrained=tag)
        except (PretrainedError, ConfigError) as err:
            problems.append(f"{name}.{tag}: {err}")
    return problems


# ---------------------------------------------------------------------------------------------------- CLI
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _load_json_or_yaml(path: Optional[str]) -> Optional[dict[str, Any]]:
    if not path:
        return None
    import yaml

    text = Path(path).read_text()
    return json.loads(text) if path.endswith(".json") else yaml.safe_load(text)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.tasks.publish", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="Lightning checkpoint -> published weights folder (+ manifest, preset tag)")
    ex.add_argument("--checkpoint", required=True, help="Lightning .ckpt (ImageClassificationTask) or state dict")
    ex.add_argument("--preset", required=True, help="preset name, e.g. vmoe_tiny_digits")
    ex.add_argument("--tag", required=True, help="weights tag, e.g. digits")
    ex.add_argument("--out", required=True, help="output folder, e.g. weights/vmoe_tiny_digits.digits")
    ex.add_argument("--metrics", help="metrics JSON (e.g. written by eval.py); a 'routing' key goes to the card")
    ex.add_argument("--recipe", help="training recipe JSON/YAML, added to the checkpoint's hyper-parameters")
    ex.add_argument("--hf-hub-id", help=f"hub repo it is published as (default {DEFAULT_HUB_ORG}/PRESET.TAG)")
    ex.add_argument("--license", default="apache-2.0")
    ex.add_argument("--mean", type=float, nargs="+", help="input normalisation mean (per channel)")
    ex.add_argument("--std", type=float, nargs="+", help="input normalisation std (per channel)")
    ex.add_argument("--override", action="append", default=[], help="config override key=value (dotted keys)")
    ex.add_argument("--dtype", choices=sorted(_DTYPES), help="store the weights in this precision")
    ex.add_argument("--default", dest="make_default", action="store_true", default=None,
                    help="make this tag the preset's default (default: if no other tag is)")
    ex.add_argument("--no-default", dest="make_default", action="store_false")
    ex.add_argument("--no-registry", action="store_true", help="do not touch the manifest / preset YAML")
    ex.add_argument("--manifest", help=f"manifest path (default {manifest_path()})")
    pu = sub.add_parser("push", help="upload a published folder to a hub repo")
    pu.add_argument("folder")
    pu.add_argument("repo_id")
    pu.add_argument("--private", action="store_true", default=None)
    pu.add_argument("--revision")
    pu.add_argument("--message", default="Upload MoE Zoo model")
    ve = sub.add_parser("verify", help="check every manifest entry (file, sha256, preset entry, loads)")
    ve.add_argument("--manifest")
    sub.add_parser("list", help="list preset tags with weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "export":
        inp = {k: v for k, v in (("mean", args.mean), ("std", args.std)) if v}
        entry = export_checkpoint(args.checkpoint, args.preset, args.tag, args.out,
                                  metrics=_load_json_or_yaml(args.metrics), recipe=_load_json_or_yaml(args.recipe),
                                  hf_hub_id=args.hf_hub_id, license=args.license, input=inp,
                                  overrides=_parse_overrides(args.override),
                                  dtype=_DTYPES[args.dtype] if args.dtype else None,
                                  make_default=args.make_default, update_registry=not args.no_registry,
                                  manifest=args.manifest)
        print(json.dumps(entry, indent=2))
        print(f"wrote {args.out}; load with zoo.create_model({args.preset!r}, pretrained={args.tag!r})")
        return 0
    if args.cmd == "push":
        info = upload_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                             commit_message=args.message)
        print(getattr(info, "commit_url", info))
        return 0
    if args.cmd == "verify":
        problems = verify_manifest(args.manifest)
        for p in problems:
            print("FAIL", p)
        n = len(read_manifest(args.manifest)["weights"])
        print(f"{n - len(problems)}/{n} manifest entries OK" if n else "manifest is empty")
        return 1 if problems else 0
    if args.cmd == "list":
        for item in list_pretrained():
            print(item)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
