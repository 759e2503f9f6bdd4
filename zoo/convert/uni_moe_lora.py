"""Official Uni-MoE v1 LoRA fine-tunes (the ``-e2`` releases) -> the tensors of a full official checkpoint, with the
LoRA deltas MERGED into the dense weights; :mod:`zoo.convert.uni_moe` then converts them like a speech-base folder.

A fine-tune folder (what the official training script writes with ``llm_lora_enable``) holds no LM weights; the LM,
experts included, comes from the checkpoint it was trained from (``--base``). Files read, and the order the official
loader applies them in (each later step overrides the earlier ones):

1. ``--base``: the full speech-base folder (weights + ``mm_projector.bin`` / ``mm_audio_aligner.bin``), read by
   :func:`zoo.convert.uni_moe_layout.read_official_tensors`. ``config.json`` is the FINE-TUNE's when it has one (the
   official loader builds the base model with the fine-tune's config), else the base's.
2. ``non_lora_trainables.bin``: full tensors (e.g. ``model.mm_projector.*``) that replace base tensors. Names carry
   ``base_model.model.`` (PEFT's wrapper): ``base_model.`` is stripped, then one ``model.`` when that leaves
   ``model.model.`` names. Every tensor must replace a base tensor of the same shape.
3. ``adapter_model.bin`` / ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT LoRA): keys
   ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]`` (an adapter name
   segment, ``lora_A.default.weight``, is accepted too). ``<module>.weight`` becomes ``W + s * B @ A`` with
   ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern``
   override r / alpha per module). Targets: the LM linears the official PEFT config can name
   (``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj``, dense
   ``model.layers.{i}.mlp.{gate,up,down}_proj``) and ``lm_head``. ``fan_in_fan_out`` is accepted and has no effect:
   these are all ``nn.Linear``, for which PEFT itself turns it off (it exists for GPT-2 ``Conv1D``), so the
   stored ``B @ A`` is always ``[out, in]`` like the weight. DoRA, LoRA biases, embedding LoRA and
   ``modules_to_save`` are refused.
4. ``mm_audio_aligner.bin`` of the fine-tune (when present): replaces the aligner and ``model.query_tokens``.
5. ``mlp_gates.bin`` (when present): the routers ``model.layers.{i}.mlp.gate.weight``, same prefix stripping.

An ``mm_projector.bin`` inside the fine-tune folder is not read (the official LoRA loader does not read it either; the
fine-tuned projector is in ``non_lora_trainables.bin``). Every mistake (no ``--base``, a key that names no base
tensor, a shape mismatch, a target outside the list) raises :class:`HFCheckpointError` naming the file and the key.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

from torch import Tensor

from zoo.convert.hf_files import HFCheckpointError, PathLike, read_json, read_weight_file
from zoo.convert.uni_moe_layout import read_official_tensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA = "non_lora_trainables.bin"
MLP_GATES = "mlp_gates.bin"
AUDIO_ALIGNER = "mm_audio_aligner.bin"

_TARGETS = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.experts\.\d+\.(gate|up|down)_proj|"
                      r"mlp\.(gate|up|down)_proj)|lm_head")
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])(\.[^.]+)?\.weight")


def is_lora_folder(folder: PathLike) -> bool:
    """True for an official LoRA fine-tune folder (``adapter_config.json`` or ``non_lora_trainables.bin``)."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() or (folder / NON_LORA).is_file()


def strip_peft_prefix(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official loader's renaming: drop ``base_model.``, then one ``model.`` if names start ``model.model.``."""
    out = {(k[len("base_model."):] if k.startswith("base_model.") else k): v for k, v in tensors.items()}
    if any(k.startswith("model.model.") for k in out):
        out = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in out.items()}
    return out


def _pattern_value(patterns: Optional[dict[str, Any]], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: a key applies to the modules whose name is it or ends in it."""
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _targeted(module: str, target_modules: Any) -> bool:
    if target_modules is None:
        return True
    if isinstance(target_modules, str):  # PEFT: a string is a regex matched against the full name
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def lora_deltas(adapter: dict[str, Tensor], config: dict[str, Any], source: str) -> dict[str, Tensor]:
    """PEFT LoRA tensors (``adapter`` as saved, ``config`` its adapter_config.json) -> ``{official weight name:
    s * B @ A}`` in float32, checked against the config. ``source`` names the file in errors."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise HFCheckpointError(f"{source}: peft_type {config.get('peft_type')!r}; only LoRA adapters are supported")
    if config.get("use_dora"):
        raise HFCheckpointError(f"{source}: use_dora is set; DoRA adapters are not supported (plain LoRA only)")
    if config.get("modules_to_save"):
        raise HFCheckpointError(f"{source}: modules_to_save {config['modules_to_save']} is not supported (the "
                                "official fine-tunes keep such tensors in non_lora_trainables.bin)")
    for k in ("r", "lora_alpha"):
        if not isinstance(config.get(k), (int, float)) or config[k] <= 0:
            raise HFCheckpointError(f"{source}: adapter_config.json needs a positive {k!r}, got {config.get(k)!r}")
    factors: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key, value in adapter.items():
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            raise HFCheckpointError(f"{source}: key {key!r} is not a LoRA factor (<module>.lora_A.weight / "
                                    "lora_B.weight); LoRA biases, embedding LoRA, DoRA magnitudes and saved modules "
                                    "are not supported")
        module = m["module"]
        module = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
        if not _TARGETS.fullmatch(module):
            raise HFCheckpointError(f"{source}: key {key!r}: unknown LoRA target {module!r}; the converter merges "
                                    "LoRA only into the LM linears (model.layers.{i}.self_attn.{q,k,v,o}_proj, "
                                    "model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj, model.layers.{i}.mlp."
                                    "{gate,up,down}_proj, lm_head)")
        if not _targeted(module, config.get("target_modules")):
            raise HFCheckpointError(f"{source}: key {key!r}: module {module!r} is not in adapter_config.json "
                                    "target_modules; adapter file and config disagree")
        slot = factors.setdefault(module, {})
        if m["which"] in slot:
            raise HFCheckpointError(f"{source}: module {module!r} has two lora_{m['which']} tensors ({key!r}, "
                                    f"{slot[m['which']][0]!r}): more than one adapter in the file")
        slot[m["which"]] = (key, value)
    deltas: dict[str, Tensor] = {}
    for module, slot in sorted(factors.items()):
        if set(slot) != {"A", "B"}:
            have = next(iter(slot.values()))[0]
            raise HFCheckpointError(f"{source}: {have!r} has no matching lora_{'B' if 'A' in slot else 'A'} tensor")
        (ka, a), (kb, b) = slot["A"], slot["B"]
        r = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise HFCheckpointError(f"{source}: {ka!r} is {tuple(a.shape)} and {kb!r} is {tuple(b.shape)}; with "
                                    f"r={r} from adapter_config.json they must be [{r}, in] and [out, {r}]")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        deltas[f"{module}.weight"] = (b.float() @ a.float()) * scaling
    return deltas


def _override(tensors: dict[str, Tensor], new: dict[str, Tensor], path: Path) -> None:
    for k, v in new.items():
        if k not in tensors:
            raise HFCheckpointError(f"{path}: key {k!r} names no tensor of the base checkpoint (wrong --base, or a "
                                    "fine-tune of another model)")
        if tuple(v.shape) != tuple(tensors[k].shape):
            raise HFCheckpointError(f"{path}: key {k!r} is {tuple(v.shape)}, the base checkpoint's is "
                                    f"{tuple(tensors[k].shape)} (wrong --base?)")
        tensors[k] = v


def merge_peft_adapter(folder: Path, tensors: dict[str, Tensor]) -> Optional[tuple[int, dict[str, Any]]]:
    """Merges the PEFT adapter of ``folder`` (``adapter_model.bin`` / ``.safetensors`` + ``adapter_config.json``)
    into ``tensors`` in place, each ``W += (lora_alpha / r) B A`` computed in fp32 and stored in W's dtype.
    Returns ``(number of deltas, adapter config)``, or None when the folder has no adapter. A config without
    weights, weights without a config, or a target the base lacks (or has at another shape) is an error naming
    the file: usually the wrong ``--base``."""
    adapter_path = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
    if adapter_path is None:
        if (folder / ADAPTER_CONFIG).is_file():
            raise HFCheckpointError(f"{folder} has {ADAPTER_CONFIG} but no {' / '.join(ADAPTER_WEIGHTS)}")
        return None
    if not (folder / ADAPTER_CONFIG).is_file():
        raise HFCheckpointError(f"{adapter_path} has no {ADAPTER_CONFIG} beside it (r, lora_alpha are needed)")
    config = read_json(folder / ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise HFCheckpointError(f"{folder / ADAPTER_CONFIG} is not a JSON object")
    deltas = lora_deltas(read_weight_file(adapter_path), config, str(adapter_path))
    for name, delta in deltas.items():
        if name not in tensors:
            raise HFCheckpointError(f"{adapter_path}: LoRA target {name[:-len('.weight')]!r} has no weight "
                                    f"{name!r} in the base checkpoint (wrong --base?)")
        w = tensors[name]
        if tuple(delta.shape) != tuple(w.shape):
            raise HFCheckpointError(f"{adapter_path}: LoRA B @ A for {name!r} is {tuple(delta.shape)}, the base "
                                    f"weight is {tuple(w.shape)} (wrong --base?)")
        tensors[name] = (w.float() + delta).to(w.dtype) if w.is_floating_point() else w
    return len(deltas), config


def read_lora_finetune(folder: PathLike, base: Optional[PathLike]) -> tuple[dict[str, Any], dict[str, Tensor],
                                                                           list[str]]:
    """(config, merged tensors under official names, notes) of the fine-tune ``folder`` trained from ``base``."""
    folder = Path(folder)
    if base is None:
        raise HFCheckpointError(f"{folder} is a Uni-MoE LoRA fine-tune ({ADAPTER_CONFIG} / {NON_LORA}) without LM "
                                "weights: pass --base DIR, the full checkpoint it was trained from (e.g. the speech "
                                "base)")
    base = Path(base)
    if not base.is_dir():
        raise FileNotFoundError(f"--base {base} is not a folder (expected the full Uni-MoE checkpoint the fine-tune "
                                "was trained from)")
    if is_lora_folder(base):
        raise HFCheckpointError(f"--base {base} is itself a LoRA fine-tune; pass the full checkpoint it was trained "
                                "from")
    base_cfg, tensors = read_official_tensors(base)
    tensors = {k: v for k, v in tensors.items()}
    cfg = read_json(folder / "config.json") if (folder / "config.json").is_file() else base_cfg
    notes = [f"LoRA fine-tune {folder.name} merged into base {base.name}"]

    path = folder / NON_LORA
    if path.is_file():
        _override(tensors, strip_peft_prefix(read_weight_file(path)), path)
    merged = merge_peft_adapter(folder, tensors)
    if merged is not None:
        notes.append(f"{merged[0]} LoRA deltas merged (r={merged[1]['r']}, lora_alpha={merged[1]['lora_alpha']})")
    for fname in (AUDIO_ALIGNER, MLP_GATES):
        path = folder / fname
        if path.is_file():
            _override(tensors, strip_peft_prefix(read_weight_file(path)), path)
    return cfg, tensors, notes


__all__ = ["is_lora_folder", "lora_deltas", "merge_peft_adapter", "read_lora_finetune", "strip_peft_prefix"]
