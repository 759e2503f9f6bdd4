"""Official Uni-MoE 8-expert ("v2", ``Uni_MoE/Uni_MoE_8e`` of HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs)
fine-tunes -> the tensors of a full official v1 checkpoint (v1 names, LoRA deltas MERGED), which
:mod:`zoo.convert.uni_moe` then converts like a speech-base folder.

    python -m zoo.convert uni-moe --checkpoint E2_DIR --base BASE_DIR --mlp-dir EXPERTS_DIR --out DIR
        [--expert-bases mlp_audiocap,mlp_basev,...] [--vision-tower DIR] [--audio-tower DIR]

What the official 8-expert code runs (read from ``Uni_MoE_speech/model/all_builder.py:load_all_pretrained_model_dp``,
``model/moe/modeling_llama_dp.py``, ``moe_dp.py``, ``llama_mlp.py``, ``train/train.py``) and where each part comes from:

- ``--base`` (the Uni-MoE-speech-base release, its ``config.json`` replaced by the release's ``8config.json``): the
  LLaMA, the image projector and the audio aligner. Its v1 MoE tensors (``model.layers.{i}.mlp.experts.*``,
  ``model.layers.{i}.mlp.gate.weight``) do not fit the 8-expert model and are dropped, as the official
  ``from_pretrained`` drops them.
- ``config.json``: the fine-tune folder's (the training script saves it there; it IS the 8-expert config), else the
  base's. ``num_experts`` (8), ``num_experts_per_tok`` (must be 2), ``moe_type`` / ``moe_stride`` (which layers are
  MoE), ``lora_r`` / ``lora_alpha`` (the expert LoRA), ``use_fm_block`` (must be false: the modality-specific 1x1
  convolutions in front of the router are not supported), ``model_type`` ``llava_llama`` (the 8-expert code's own
  name; read as v1 ``llava``). ``ep_size`` / ``capacity_factor`` only place / size DeepSpeed's buffers.
- expert BASES: dense FFN files ``{name}.bin`` in ``--mlp-dir`` (the Uni-MoE-8e-Experts release), keys
  ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``. Expert ``e`` takes the file ``expert_bases[e]``; the default
  table is the one written in the official code (``train.py`` and ``all_builder.py``, as a fixed list),
  :data:`OFFICIAL_EXPERT_BASES` = ``mlp_audiocap, mlp_basev, mlp_base, mlp_base1, mlp_base4, mlp_base7, mlp_base,
  mlp_base7`` (experts 2 / 6 share ``mlp_base``, 5 / 7 share ``mlp_base7``); ``--expert-bases`` replaces it (one
  file name per expert, comma-separated, ``.bin`` optional).
- expert LoRA: ``{e}_mlp_experts.bin`` in the fine-tune folder, one file per expert (an 8-rank expert-parallel run
  writes one per rank), keys
  ``model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{slot}.{p}_lora_{A,B}.weight`` (``p`` in
  gate_proj / up_proj / down_proj; ``slot`` is the rank-local index, ignored as the official loader ignores it, but
  one file must hold one slot). The file also holds the expert's base ``{p}.weight``; the official
  loader lets the ``--mlp-dir`` file win over it, and so does this reader. Expert = SwiGLU whose three projections
  are ``W + (lora_alpha / lora_r) B A`` (``LlamaMLPLoRA``; LoRA dropout is off in eval).
- routers: ``mlp_gates.bin`` (``model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight`` ``[E, H]``), over
  ``non_lora_trainables.bin``; then the PEFT adapter (``adapter_config.json`` + ``adapter_model.bin``: LoRA on the
  attention projections, merged by :func:`zoo.convert.uni_moe_lora.lora_deltas`), then ``mm_audio_aligner.bin``,
  in the official loader's order. ``non_lora_trainables.bin`` names carry PEFT's ``base_model.model.`` prefix
  (stripped as the official loader does). ``fm_adapter.bin`` is read only to check it is empty or unused.

Routing (DeepSpeed 0.14 ``MoE(..., drop_tokens=False)`` with the official patched ``top2gating``): softmax over the
fp32 router logits, expert 1 = argmax, expert 2 = argmax of the logits with expert 1 excluded, the two gates
renormalised, NO capacity (dropless). DIFFERENCES ON PURPOSE:

- the official gate adds Gumbel noise to the logits before picking expert 2 (``top2_2nd_expert_sampling``, on by
  default in DeepSpeed 0.14, in training AND eval), so its outputs are random. The zoo default is the deterministic
  second-highest logit (= the official with sampling off; the parity fixture was made that way). The official
  behaviour is available on the converted model: ``zoo.create_model("local-dir:OUT",
  **{"decoder.moe.deepspeed_top2_gating": "gumbel"})`` (dropless, so no token is dropped either way).
- the official loader casts ``mlp_gates.bin`` and ``mm_audio_aligner.bin`` to float16 before loading them (and runs
  the model in bfloat16); the converter keeps the stored precision.

Every missing file (an expert file, a base file, ``mlp_gates.bin``) or tensor is an :class:`HFCheckpointError` /
``FileNotFoundError`` that names the file and the flag that fixes it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import Tensor

from zoo.convert.hf_files import HFCheckpointError, PathLike, read_json, read_weight_file
from zoo.convert.uni_moe_layout import _moe_layers, read_official_tensors
from zoo.convert.uni_moe_lora import (AUDIO_ALIGNER, MLP_GATES, NON_LORA, _override, is_lora_folder,
                                      merge_peft_adapter, strip_peft_prefix)

#: The official base-FFN file of each of the 8 experts (the fixed list in ``Uni_MoE_8e/Uni_MoE_speech/train/train.py``
#: and ``model/all_builder.py``): expert e's base is ``{mlp_dir}/{OFFICIAL_EXPERT_BASES[e]}.bin``.
OFFICIAL_EXPERT_BASES: tuple[str, ...] = ("mlp_audiocap", "mlp_basev", "mlp_base", "mlp_base1", "mlp_base4",
                                          "mlp_base7", "mlp_base", "mlp_base7")
EXPERT_FILE = "{e}_mlp_experts.bin"
FM_ADAPTER = "fm_adapter.bin"
PROJS = ("gate_proj", "up_proj", "down_proj")

_EXPERT_KEY = re.compile(r"model\.layers\.(?P<layer>\d+)\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\."
                         r"(?P<slot>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)(?P<lora>_lora_[AB])?\.weight")
_BASE_KEY = re.compile(r"model\.layers\.(?P<layer>\d+)\.mlp\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")
_GATE_KEY = re.compile(r"model\.layers\.(?P<layer>\d+)\.mlp\.deepspeed_moe\.gate\.wg\.weight")
_V1_MOE_KEY = re.compile(r"model\.layers\.\d+\.mlp\.(experts\.\d+\.(gate|up|down)_proj|gate)\.weight")


def is_8e_folder(folder: PathLike) -> bool:
    """True for an official 8-expert fine-tune folder: it holds ``{e}_mlp_experts.bin`` files."""
    folder = Path(folder)
    return folder.is_dir() and any(re.fullmatch(r"\d+_mlp_experts\.bin", p.name) for p in folder.iterdir())


def parse_expert_bases(value: Union[None, str, Sequence[str]]) -> Optional[tuple[str, ...]]:
    """``--expert-bases``: ``"mlp_a,mlp_b,..."`` (or a sequence) -> file stems, one per expert; None stays None."""
    if value is None:
        return None
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() for n in names]
    names = [n[:-len(".bin")] if n.endswith(".bin") else n for n in names]
    if not names or any(not n or "/" in n or "\\" in n for n in names):
        raise HFCheckpointError(f"--expert-bases {value!r}: expected comma-separated file names of --mlp-dir, one "
                                "per expert (e.g. mlp_audiocap,mlp_basev,...)")
    return tuple(names)


def _layer_of(match: re.Match, layers: Sequence[int], source: Path, key: str) -> int:
    i = int(match["layer"])
    if i not in layers:
        raise HFCheckpointError(f"{source}: key {key!r} is for layer {i}, but config.json makes layers {list(layers)} "
                                "MoE (moe_type / moe_stride / num_hidden_layers); files from another model?")
    return i


def read_expert_bases(mlp_dir: Optional[PathLike], names: Sequence[str], num_experts: int, layers: Sequence[int]
                      ) -> dict[str, dict[int, dict[str, Tensor]]]:
    """``{name: {layer: {proj: weight}}}`` for every distinct base file ``names`` uses (each read once)."""
    if mlp_dir is None:
        raise HFCheckpointError("an 8-expert Uni-MoE fine-tune takes its experts' base FFNs from separate dense files "
                                f"({', '.join(sorted(set(names)))}.bin): pass --mlp-dir DIR, the folder that holds "
                                "them (the Uni-MoE-8e-Experts release)")
    mlp_dir = Path(mlp_dir)
    if not mlp_dir.is_dir():
        raise FileNotFoundError(f"--mlp-dir {mlp_dir} is not a folder (expected the folder with the experts' base "
                                f"FFN files {', '.join(sorted(set(names)))}.bin)")
    if len(names) != num_experts:
        raise HFCheckpointError(f"the expert-base table names {len(names)} files ({','.join(names)}) but config.json "
                                f"has num_experts={num_experts}: pass --expert-bases with one file name per expert")
    out: dict[str, dict[int, dict[str, Tensor]]] = {}
    for name in dict.fromkeys(names):
        path = mlp_dir / f"{name}.bin"
        if not path.is_file():
            users = [e for e, n in enumerate(names) if n == name]
            raise FileNotFoundError(f"{path} is missing: it is the base FFN of expert(s) {users} "
                                    f"(expert-base table {','.join(names)}). Put the file in --mlp-dir, or pass "
                                    "--expert-bases naming the files that are there")
        per_layer: dict[int, dict[str, Tensor]] = {}
        for key, value in read_weight_file(path).items():
            m = _BASE_KEY.fullmatch(key)
            if m is None:
                raise HFCheckpointError(f"{path}: key {key!r} is not a dense FFN weight "
                                        "(model.layers.{i}.mlp.{gate,up,down}_proj.weight); not an expert-base file")
            per_layer.setdefault(_layer_of(m, layers, path, key), {})[m["proj"]] = value
        for i in layers:
            missing = [p for p in PROJS if p not in per_layer.get(i, {})]
            if missing:
                raise HFCheckpointError(f"{path} lacks model.layers.{i}.mlp.{{{','.join(missing)}}}.weight; every "
                                        f"MoE layer {list(layers)} needs all three projections")
        out[name] = per_layer
    return out


def read_expert_lora(path: Path, layers: Sequence[int]) -> dict[int, dict[str, tuple[Tensor, Tensor]]]:
    """``{layer: {proj: (A, B)}}`` of one ``{e}_mlp_experts.bin``; the base copies in it are skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the 8-expert fine-tune keeps expert e's LoRA in {EXPERT_FILE} "
                                "(one file per expert, e = 0 .. num_experts - 1); copy all of them from the release")
    slots: set[int] = set()
    found: dict[int, dict[str, dict[str, Tensor]]] = {}
    for key, value in strip_peft_prefix(read_weight_file(path)).items():
        m = _EXPERT_KEY.fullmatch(key)
        if m is None:
            raise HFCheckpointError(f"{path}: key {key!r} is not an expert tensor (model.layers.{{i}}.mlp."
                                    "deepspeed_moe.experts.deepspeed_experts.{slot}.{gate,up,down}_proj[_lora_A|"
                                    "_lora_B].weight)")
        slots.add(int(m["slot"]))
        if m["lora"]:
            found.setdefault(_layer_of(m, layers, path, key), {}).setdefault(m["proj"], {})[m["lora"][-1]] = value
    if len(slots) > 1:
        raise HFCheckpointError(f"{path} holds the experts of several rank-local slots {sorted(slots)} (saved by a "
                                "run with more than one expert per rank); the official loader would merge them into "
                                "one expert. Only one-expert-per-file folders are supported")
    out: dict[int, dict[str, tuple[Tensor, Tensor]]] = {}
    for i in layers:
        for p in PROJS:
            ab = found.get(i, {}).get(p, {})
            if set(ab) != {"A", "B"}:
                raise HFCheckpointError(f"{path} lacks the LoRA factor(s) "
                                        f"{[f'{p}_lora_{x}' for x in 'AB' if x not in ab]} of layer {i}")
            out.setdefault(i, {})[p] = (ab["A"], ab["B"])
    return out


def _check_config(cfg: dict[str, Any], source: str) -> tuple[int, list[int], float, int]:
    if cfg.get("moe") is None or "num_experts" not in cfg:
        raise HFCheckpointError(f"{source}: config.json has no 'moe' / num_experts; an 8-expert fine-tune needs the "
                                "8-expert config (the release's 8config.json)")
    if cfg.get("use_fm_block"):
        raise HFCheckpointError(f"{source}: use_fm_block is true (modality-specific 1x1 convolutions in front of the "
                                "router, fm_adapter.bin); not supported")
    if int(cfg.get("num_experts_per_tok", 0)) != 2:
        raise HFCheckpointError(f"{source}: num_experts_per_tok={cfg.get('num_experts_per_tok')!r}; the 8-expert "
                                "code's DeepSpeed gate is converted for top-2 only")
    r, alpha = cfg.get("lora_r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise HFCheckpointError(f"{source}: config.json needs lora_r > 0 and lora_alpha (the experts' LoRA, "
                                f"LlamaMLPLoRA; the release's 8config.json has them), got lora_r={r!r}, "
                                f"lora_alpha={alpha!r}")
    try:
        layers = _moe_layers(cfg)
    except KeyError as err:
        raise HFCheckpointError(f"{source}: config.json lacks {err}") from err
    return int(cfg["num_experts"]), layers, float(alpha) / r, r


def read_8e_finetune(folder: PathLike, base: Optional[PathLike], mlp_dir: Optional[PathLike] = None,
                     expert_bases: Union[None, str, Sequence[str]] = None
                     ) -> tuple[dict[str, Any], dict[str, Tensor], list[str]]:
    """(config, tensors under the v1 official names with every LoRA merged, notes) of the 8-expert fine-tune
    ``folder`` on ``base`` with the expert bases of ``mlp_dir``; see the module docstring."""
    folder = Path(folder)
    if base is None:
        raise HFCheckpointError(f"{folder} is an 8-expert Uni-MoE fine-tune ({EXPERT_FILE} files) without LM weights: "
                                "pass --base DIR, the full checkpoint it was trained from (Uni-MoE-speech-base)")
    base = Path(base)
    if not base.is_dir():
        raise FileNotFoundError(f"--base {base} is not a folder (expected Uni-MoE-speech-base, the full checkpoint)")
    if is_lora_folder(base) or is_8e_folder(base):
        raise HFCheckpointError(f"--base {base} is itself a fine-tune; pass the full checkpoint it was trained from")
    base_cfg, tensors = read_official_tensors(base)
    cfg = read_json(folder / "config.json") if (folder / "config.json").is_file() else base_cfg
    if not isinstance(cfg, dict):
        raise HFCheckpointError(f"{folder / 'config.json'} is not a JSON object")
    E, layers, scaling, r = _check_config(cfg, str(folder / "config.json"))
    names = parse_expert_bases(expert_bases) or OFFICIAL_EXPERT_BASES
    notes = [f"8-expert fine-tune {folder.name} on base {base.name}; expert bases from {Path(str(mlp_dir)).name}: "
             f"{','.join(names)}" + (" (the official table)" if names == OFFICIAL_EXPERT_BASES else "")]

    # the 8-expert model has no v1 MoE tensors: the official from_pretrained drops them
    dropped = [k for k in tensors if _V1_MOE_KEY.fullmatch(k)]
    for k in dropped:
        del tensors[k]
    if cfg.get("model_type") == "llava_llama":
        cfg = {**cfg, "model_type": "llava"}

    # experts: base file + merged LoRA (the base file wins over the copy inside the expert file, as officially)
    bases = read_expert_bases(mlp_dir, names, E, layers)
    for e in range(E):
        lora = read_expert_lora(folder / EXPERT_FILE.format(e=e), layers)
        for i in layers:
            for p in PROJS:
                w = bases[names[e]][i][p]
                a, b = lora[i][p]
                if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r or \
                        (b.shape[0], a.shape[1]) != tuple(w.shape):
                    raise HFCheckpointError(
                        f"{folder / EXPERT_FILE.format(e=e)}: layer {i} {p} LoRA A {tuple(a.shape)} / B "
                        f"{tuple(b.shape)} do not fit the base {tuple(w.shape)} from {names[e]}.bin with "
                        f"lora_r={r} (wrong --mlp-dir / --expert-bases?)")
                merged = w.float() + (b.float() @ a.float()) * scaling
                tensors[f"model.layers.{i}.mlp.experts.{e}.{p}.weight"] = merged.to(w.dtype)

    # routers and the other trainables, in the official loader's order
    gates: dict[int, Tensor] = {}

    def take_gates(new: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
        rest = {}
        for k, v in new.items():
            m = _GATE_KEY.fullmatch(k)
            if m is None:
                rest[k] = v
                continue
            i = _layer_of(m, layers, path, k)
            if tuple(v.shape) != (E, tensors["model.embed_tokens.weight"].shape[1]):
                raise HFCheckpointError(f"{path}: router {k!r} is {tuple(v.shape)}, expected [num_experts={E}, "
                                        "hidden]")
            gates[i] = v
        return rest

    path = folder / NON_LORA
    if path.is_file():
        _override(tensors, take_gates(strip_peft_prefix(read_weight_file(path)), path), path)
    path = folder / MLP_GATES
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the 8-expert routers (model.layers.{{i}}.mlp.deepspeed_moe.gate."
                                "wg.weight) are saved there; copy it from the release")
    left = take_gates(strip_peft_prefix(read_weight_file(path)), path)
    if left:
        raise HFCheckpointError(f"{path}: {sorted(left)[:3]} are not routers (model.layers.{{i}}.mlp.deepspeed_moe."
                                "gate.wg.weight)")
    missing = [i for i in layers if i not in gates]
    if missing:
        raise HFCheckpointError(f"no router for MoE layer(s) {missing} in {MLP_GATES} / {NON_LORA} of {folder}")
    for i, w in gates.items():
        tensors[f"model.layers.{i}.mlp.gate.weight"] = w
    path = folder / FM_ADAPTER
    if path.is_file() and read_weight_file(path):
        notes.append(f"{FM_ADAPTER} ignored (use_fm_block is false: the official model has no such modules)")

    merged = merge_peft_adapter(folder, tensors)
    if merged is not None:
        notes.append(f"{merged[0]} attention LoRA deltas merged (r={merged[1]['r']}, "
                     f"lora_alpha={merged[1]['lora_alpha']})")
    path = folder / AUDIO_ALIGNER
    if path.is_file():
        _override(tensors, strip_peft_prefix(read_weight_file(path)), path)
    notes.append(f"{E} experts = base FFN + (lora_alpha / lora_r = {scaling:g}) B A, merged; second expert = "
                 "second-highest router logit (the official DeepSpeed gate samples it with Gumbel noise)")
    return cfg, tensors, notes


__all__ = ["OFFICIAL_EXPERT_BASES", "is_8e_folder", "parse_expert_bases", "read_8e_finetune", "read_expert_bases",
           "read_expert_lora"]
