"""Reading an official Uni-MoE v1 checkpoint folder (HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs, ``Uni_MoE_speech``
code: LLaMA with Mixtral-style MoE FFNs, a CLIP image tower + MLP projector, a Whisper encoder + Whisper-decoder
"Q-Former" audio aligner) into grouped tensors and settings, without transformers. The zoo Uni-MoE converter maps
:class:`UniMoELayout` onto its own modules; this module knows only the official names.

Layout read (what the official ``LlavaLlamaForCausalLM.save_pretrained`` writes; ``config.json`` has
``"model_type": "llava"``, ``"moe"`` (any non-null value switches every layer to MoE), ``num_experts``,
``num_experts_per_tok``, ``mm_vision_tower``, ``mm_audio_tower``, ``query_tokens_size``):

- LM: ``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`` (no biases),
  ``model.layers.{i}.{input,post_attention}_layernorm.weight`` (RMSNorm), ``model.norm.weight``, ``lm_head.weight``;
  ``model.layers.{i}.self_attn.rotary_emb.inv_freq`` (a buffer transformers 4.31 saves) is skipped.
- routers ``model.layers.{i}.mlp.gate.weight`` ``[E, H]`` (no bias); experts
  ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`` (SwiGLU, no bias). A config with ``"moe": null``
  has dense ``model.layers.{i}.mlp.{gate,up,down}_proj.weight`` instead (returned as ``dense_mlps``).
- image projector ``model.mm_projector.*`` (``mlp2x_gelu``: ``0`` Linear, GELU, ``2`` Linear; ``linear``: one).
- audio aligner ``model.mm_audio_aligner.decoder.audio_decoder.*`` (a transformers ``WhisperDecoder``; its
  ``embed_tokens`` is never used: the query tokens are fed as ``inputs_embeds``),
  ``model.mm_audio_aligner.projector.*`` (``linear`` or ``mlpNx_gelu``), and ``model.query_tokens`` ``[1, Q, d]``.
- tower weights saved in the checkpoint are NOT what the official loader runs: ``model.vision_tower.vision_tower.*``
  and ``model.audio_tower.audio_tower.*`` are dropped by ``from_pretrained`` and reloaded from the tower folders named
  by ``mm_vision_tower`` / ``mm_audio_tower``; ``model.audio_tower.{encoder,decoder}.*`` belong to a WhisperModel
  the official ``WhisperAudioTower`` inherits from and never runs. They are returned under ``ignored`` (names only).
- ``mm_projector.bin`` / ``mm_audio_aligner.bin`` beside the weights (the training script's adapter files, full
  ``model.``-prefixed names) are used only when the main weights lack those groups; when both exist they must agree.

Tower folders come from the arguments only: the config's ``mm_vision_tower`` / ``mm_audio_tower`` strings (often
``/path/to/...`` on the authors' machines) are reported in ``settings`` and never opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from zoo.convert.hf_files import HFCheckpointError, PathLike, read_hf_folder, read_weight_file

IMAGE_TOKEN_INDEX = -200
AUDIO_TOKEN_INDEX = -300
VIDEO_TOKEN_INDEX = -400
IGNORE_INDEX = -100


@dataclass
class UniMoELayout:
    """Grouped tensors of one official Uni-MoE v1 checkpoint. Tensor names inside each group are relative:

    - ``lm``: ``embed_tokens.weight``, ``layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
      ``layers.{i}.input_layernorm.weight``, ``layers.{i}.post_attention_layernorm.weight``, ``norm.weight``,
      ``lm_head.weight``.
    - ``routers[i]``: ``[num_experts, hidden]`` router of layer ``i`` (official ``model.layers.{i}.mlp.gate``).
    - ``experts[i][e]``: ``{"gate_proj.weight", "up_proj.weight", "down_proj.weight"}`` of expert ``e``.
    - ``dense_mlps[i]``: same keys for a layer without MoE (``config["moe"]`` null, or a layer skipped by the
      8-expert code's ``moe_type: "sparse"`` / ``moe_stride``).
    - ``projector``: ``{"0.weight", "0.bias", "2.weight", "2.bias"}`` (``mlp2x_gelu``) of ``model.mm_projector``.
    - ``audio_aligner``: ``decoder.*`` (WhisperDecoder names: ``embed_positions.weight``, ``layers.{j}.self_attn.*``,
      ``layers.{j}.encoder_attn.*``, ``layers.{j}.fc1/fc2.*``, ``layers.{j}.*_layer_norm.*``, ``layer_norm.*``;
      ``embed_tokens.weight`` is present but unused), ``projector.*``, and ``query_tokens`` ``[1, Q, d_whisper]``.
    - ``vision_tower`` / ``audio_tower``: ``(config.json dict, tensors)`` read from the tower folders passed in
      (``None`` when not passed); the audio tower's tensors are a full ``WhisperModel`` (the official code runs only
      its ``encoder.*``).
    - ``settings``: numbers the model must match (see :func:`read_uni_moe_layout`).
    - ``ignored``: checkpoint tensor names deliberately not used (shadow tower copies, rotary ``inv_freq``).
    """

    config: dict[str, Any]
    settings: dict[str, Any]
    lm: dict[str, Tensor]
    routers: dict[int, Tensor]
    experts: dict[int, list[dict[str, Tensor]]]
    dense_mlps: dict[int, dict[str, Tensor]]
    projector: dict[str, Tensor]
    audio_aligner: dict[str, Tensor]
    vision_tower: Optional[tuple[dict[str, Any], dict[str, Tensor]]] = None
    audio_tower: Optional[tuple[dict[str, Any], dict[str, Tensor]]] = None
    ignored: list[str] = field(default_factory=list)


_IGNORED_PREFIXES = ("model.vision_tower.", "model.audio_tower.")
_ADAPTER_FILES = {"projector": ("mm_projector.bin", ("model.mm_projector.",)),
                  "audio_aligner": ("mm_audio_aligner.bin", ("model.mm_audio_aligner.", "model.query_tokens"))}


def _moe_layers(cfg: dict[str, Any]) -> list[int]:
    """v1: every layer once ``moe`` is set. The 8-expert (v2) code also reads ``moe_type``: ``"dense"`` = every
    layer, ``"sparse"`` = layers ``i % moe_stride == 0``."""
    n, kind = cfg["num_hidden_layers"], cfg.get("moe_type")
    if kind is None or kind == "dense":
        return list(range(n))
    if kind == "sparse":
        stride = int(cfg.get("moe_stride") or 1)
        return [i for i in range(n) if i % stride == 0]
    raise HFCheckpointError(f"Uni-MoE config.json moe_type {kind!r} is neither 'sparse' nor 'dense'")


def _settings(cfg: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in cfg]
    if missing:
        raise HFCheckpointError(f"Uni-MoE config.json lacks {missing}")
    moe = cfg.get("moe") is not None
    if moe and ("num_experts" not in cfg or "num_experts_per_tok" not in cfg):
        raise HFCheckpointError("Uni-MoE config.json has 'moe' set but lacks num_experts / num_experts_per_tok")
    rope_theta = cfg.get("rope_theta", 10000.0)
    return {
        "vocab_size": cfg["vocab_size"], "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"], "num_layers": cfg["num_hidden_layers"],
        "num_heads": cfg["num_attention_heads"],
        "num_kv_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6), "rope_theta": float(rope_theta),
        "rope_scaling": cfg.get("rope_scaling"), "hidden_act": cfg.get("hidden_act", "silu"),
        "max_position_embeddings": cfg.get("max_position_embeddings"),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "pad_token_id": cfg.get("pad_token_id"), "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "moe": moe, "num_experts": cfg.get("num_experts") if moe else 0,
        "top_k": cfg.get("num_experts_per_tok") if moe else 0,
        "moe_layers": _moe_layers(cfg) if moe else [],
        "mm_projector_type": cfg.get("mm_projector_type", "linear"), "mm_hidden_size": cfg.get("mm_hidden_size"),
        "mm_vision_select_layer": cfg.get("mm_vision_select_layer", -2),
        "mm_vision_select_feature": cfg.get("mm_vision_select_feature", "patch"),
        "audio_projector_type": cfg.get("audio_projector_type", "linear"),
        "mm_audio_hidden_size": cfg.get("mm_audio_hidden_size"),
        "mm_audio_select_layer": cfg.get("mm_audio_select_layer", 0),
        "query_tokens_size": cfg.get("query_tokens_size"),
        "mm_vision_tower_name": cfg.get("mm_vision_tower"), "mm_audio_tower_name": cfg.get("mm_audio_tower"),
        "image_token_index": IMAGE_TOKEN_INDEX, "audio_token_index": AUDIO_TOKEN_INDEX,
        "video_token_index": VIDEO_TOKEN_INDEX,
    }


def _read_tower(folder: Optional[PathLike], kind: str, model_types: tuple[str, ...]):
    if folder is None:
        return None
    cfg, tensors = read_hf_folder(folder)
    if cfg.get("model_type") not in model_types:
        raise HFCheckpointError(f"{folder} is a {cfg.get('model_type')!r} folder; the Uni-MoE {kind} tower must be "
                                f"one of {list(model_types)}")
    return cfg, tensors


def _group(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def read_official_tensors(folder: PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """config.json and every tensor of an official Uni-MoE folder under its official name: the main weights plus
    the adapter files beside them (``mm_projector.bin`` / ``mm_audio_aligner.bin``, used where the main weights lack
    those tensors; they must agree otherwise)."""
    folder = Path(folder)
    cfg, tensors = read_hf_folder(folder)
    tensors = dict(tensors)
    # adapter files: fill in groups the main weights lack; check agreement otherwise
    for group, (fname, prefixes) in _ADAPTER_FILES.items():
        path = folder / fname
        if not path.is_file():
            continue
        extra = read_weight_file(path)
        bad = [k for k in extra if not k.startswith(prefixes)]
        if bad:
            raise HFCheckpointError(f"{path} holds tensors outside {list(prefixes)}: {bad[:3]}")
        for k, v in extra.items():
            if k not in tensors:
                tensors[k] = v
            elif tensors[k].shape != v.shape or not torch.equal(tensors[k].to(v.dtype), v):
                raise HFCheckpointError(f"{path} and the main weights disagree on {k!r}; the folder mixes runs")

    return cfg, tensors


def read_uni_moe_layout(folder: PathLike, *, vision_tower_dir: Optional[PathLike] = None,
                        audio_tower_dir: Optional[PathLike] = None,
                        config: Optional[dict[str, Any]] = None,
                        tensors: Optional[dict[str, Tensor]] = None) -> UniMoELayout:
    """Read an official Uni-MoE v1 (speech / 4-expert) checkpoint folder. ``vision_tower_dir`` (a CLIP vision
    folder) and ``audio_tower_dir`` (a Whisper folder) are read when given; the config's own tower paths are never
    followed. Raises :class:`HFCheckpointError` for another model type, missing or unknown tensors, or shapes that
    disagree with config.json; ``FileNotFoundError`` for missing files (e.g. a shard holding experts).
    ``config`` + ``tensors`` (official names, e.g. a LoRA fine-tune already merged by
    :mod:`zoo.convert.uni_moe_lora`) replace reading ``folder``, which then only names the source in messages."""
    folder = Path(folder)
    if tensors is None:
        cfg, tensors = read_official_tensors(folder)
    else:
        cfg, tensors = dict(config or {}), dict(tensors)
    if cfg.get("model_type") != "llava" or "mm_audio_tower" not in cfg and "num_experts" not in cfg:
        raise HFCheckpointError(f"{folder} is not an official Uni-MoE checkpoint: model_type "
                                f"{cfg.get('model_type')!r} (expected 'llava' with mm_audio_tower / num_experts)")
    s = _settings(cfg)

    taken: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in tensors:
            raise HFCheckpointError(f"{folder}: the checkpoint lacks tensor {name!r} that its config.json implies "
                                    "(an incomplete download, or config and weights from different runs)")
        taken.add(name)
        return tensors[name]

    H, L = s["hidden_size"], s["num_layers"]
    lm: dict[str, Tensor] = {"embed_tokens.weight": take("model.embed_tokens.weight"),
                             "norm.weight": take("model.norm.weight")}
    if "lm_head.weight" in tensors or not s["tie_word_embeddings"]:
        lm["lm_head.weight"] = take("lm_head.weight")
    routers: dict[int, Tensor] = {}
    experts: dict[int, list[dict[str, Tensor]]] = {}
    dense: dict[int, dict[str, Tensor]] = {}
    proj_names = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
    for i in range(L):
        p = f"model.layers.{i}."
        for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
            lm[f"layers.{i}.{n}"] = take(p + n)
        if i in s["moe_layers"]:
            E = s["num_experts"]
            routers[i] = take(p + "mlp.gate.weight")
            if tuple(routers[i].shape) != (E, H):
                raise HFCheckpointError(f"router {p}mlp.gate.weight is {tuple(routers[i].shape)}, config.json says "
                                        f"[{E}, {H}]")
            experts[i] = [{n: take(f"{p}mlp.experts.{e}.{n}") for n in proj_names} for e in range(E)]
        else:
            dense[i] = {n: take(f"{p}mlp.{n}") for n in proj_names}
    projector = {}
    for k in sorted(_group(tensors, "model.mm_projector.")):
        projector[k] = take("model.mm_projector." + k)
    aligner = {k: take("model.mm_audio_aligner." + k) for k in sorted(_group(tensors, "model.mm_audio_aligner."))}
    if "mm_audio_tower" in cfg:
        if not projector and "mm_vision_tower" in cfg:
            raise HFCheckpointError(f"{folder}: no model.mm_projector.* tensors in the weights or mm_projector.bin")
        if not any(k.startswith("decoder.audio_decoder.") for k in aligner) or \
                not any(k.startswith("projector.") for k in aligner):
            raise HFCheckpointError(f"{folder}: the audio aligner (model.mm_audio_aligner.decoder.audio_decoder.*, "
                                    "model.mm_audio_aligner.projector.*) is missing from the weights and "
                                    "mm_audio_aligner.bin")
        aligner = {("decoder." + k[len("decoder.audio_decoder."):]) if k.startswith("decoder.audio_decoder.") else k:
                   v for k, v in aligner.items()}
        aligner["query_tokens"] = take("model.query_tokens")
        q = s["query_tokens_size"]
        if q is not None and aligner["query_tokens"].shape[1] != q:
            raise HFCheckpointError(f"model.query_tokens has {aligner['query_tokens'].shape[1]} queries, "
                                    f"config.json query_tokens_size says {q}")
    ignored = sorted(k for k in tensors if k not in taken and
                     (k.startswith(_IGNORED_PREFIXES) or k.endswith(".rotary_emb.inv_freq")))
    unknown = sorted(k for k in tensors if k not in taken and k not in set(ignored))
    if unknown:
        raise HFCheckpointError(f"{folder}: {len(unknown)} tensor(s) this reader does not know, e.g. {unknown[:5]}; "
                                "not a Uni-MoE v1 speech layout (an -e2 LoRA folder or a v2 checkpoint?)")
    # shapes the model must agree on
    if projector:
        first = projector.get("0.weight", projector.get("weight"))
        if first is not None and s["mm_hidden_size"] is not None and first.shape[1] != s["mm_hidden_size"]:
            raise HFCheckpointError(f"mm_projector input is {first.shape[1]}, config mm_hidden_size is "
                                    f"{s['mm_hidden_size']}")
    return UniMoELayout(
        config=cfg, settings=s, lm=lm, routers=routers, experts=experts, dense_mlps=dense, projector=projector,
        audio_aligner=aligner,
        vision_tower=_read_tower(vision_tower_dir, "vision", ("clip_vision_model", "clip")),
        audio_tower=_read_tower(audio_tower_dir, "audio", ("whisper",)), ignored=ignored)
