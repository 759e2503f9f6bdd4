"""Hugging Face transformers causal-LM folders -> zoo decoder folders (weights only; transformers is not needed).

    python -m zoo.convert hf-lm --checkpoint DIR --out DIR

``DIR`` holds ``config.json`` and ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
model_type ``llama``, ``qwen2``, ``stablelm``, ``phi``, ``mixtral``, ``olmoe``, ``qwen2_moe`` and Qwen-1's remote-code
``qwen`` are read. Every checkpoint tensor must be used and every zoo parameter filled, with matching shapes;
anything else is an error naming the tensor.

Memory: the zoo model is built on the ``meta`` device and the converted tensors become its parameters
(:mod:`zoo.convert.empty_init`), in the checkpoint's precision unless ``--dtype`` asks for another; safetensors
tensors are read one at a time as they are converted (:func:`~zoo.convert.hf_files.open_hf_weights`). Peak memory is
about one copy of the model in the output precision (a bf16 7B: ~14 GB), never a float32 build.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from zoo.config import ConfigError, from_dict
from zoo.convert.empty_init import init_empty, load_empty
from zoo.convert.hf_files import HFCheckpointError, TensorPool, main_dtype, open_hf_weights, read_hf_config
from zoo.models.decoder import DecoderConfig, DecoderLM

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------- config maps
def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE theta and partial-rotary fraction, from transformers 5's ``rope_parameters`` or 4's top-level keys."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise HFCheckpointError(f"RoPE scaling {kind!r} is not supported (only the default RoPE)")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return {"rope_base": float(theta), "rotary_fraction": float(fraction)}


def _common(hf: dict[str, Any]) -> dict[str, Any]:
    out = {"vocab_size": hf["vocab_size"], "dim": hf["hidden_size"], "depth": hf["num_hidden_layers"],
           "num_heads": hf["num_attention_heads"], "num_kv_heads": hf.get("num_key_value_heads"),
           "mlp_dim": hf["intermediate_size"], "max_seq_len": hf.get("max_position_embeddings", 4096),
           "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
           "norm_eps": float(hf.get("rms_norm_eps", hf.get("layer_norm_eps", 1e-6)))}
    head_dim = hf.get("head_dim")
    if head_dim and head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
        out["head_dim"] = head_dim
    out.update(_rope(hf))
    return out


def _swiglu(hf: dict[str, Any]) -> dict[str, Any]:
    """The gated MLP's activation (only SiLU, i.e. SwiGLU, is supported)."""
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HFCheckpointError(f"hidden_act {act!r} with a gated MLP is not supported (only silu = SwiGLU)")
    return {"activation": "swiglu"}


def _moe(hf: dict[str, Any], num_experts: int, renormalize: bool, **extra: Any) -> dict[str, Any]:
    """Dropless top-k routing of Mixtral / OLMoE / Qwen2-MoE: softmax over all experts, no noise, no capacity."""
    return {"num_experts": num_experts, "top_k": hf["num_experts_per_tok"], "renormalize": renormalize,
            "dropless": True, "noise_std": 0.0, "batch_priority": False, "group_size": 1, "activation": "swiglu",
            "expert_bias": False, "importance_loss_weight": 0.0, "load_loss_weight": 0.0,
            "switch_loss_weight": float(hf.get("router_aux_loss_coef", 0.0)), **extra}


def _refuse(hf: dict[str, Any], **unsupported: Any) -> None:
    for key, default in unsupported.items():
        if hf.get(key, default) != default:
            raise HFCheckpointError(f"{hf.get('model_type')} checkpoints with {key}={hf[key]!r} are not supported")


def _llama(hf):
    _refuse(hf, pretraining_tp=1)
    bias = bool(hf.get("attention_bias", False))
    return {**_common(hf), **_swiglu(hf), "qkv_bias": bias, "attn_out_bias": bias,
            "mlp_bias": bool(hf.get("mlp_bias", False))}


def _qwen2(hf):
    _refuse(hf, use_sliding_window=False)
    return {**_common(hf), **_swiglu(hf), "qkv_bias": True}


def _stablelm(hf):
    _refuse(hf, qk_layernorm=False)
    return {**_common(hf), **_swiglu(hf), "norm": "layernorm", "qkv_bias": bool(hf.get("use_qkv_bias", False)),
            "parallel_residual": bool(hf.get("use_parallel_residual", False))}


def _phi(hf):
    _refuse(hf, qk_layernorm=False)
    act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(hf.get("hidden_act"))
    if act is None:
        raise HFCheckpointError(f"phi hidden_act {hf.get('hidden_act')!r} is not supported (gelu_new or gelu)")
    return {**_common(hf), "activation": act, "norm": "layernorm", "mlp_bias": True, "qkv_bias": True,
            "attn_out_bias": True, "lm_head_bias": True, "parallel_residual": True}


def _mixtral(hf):
    _refuse(hf, router_jitter_noise=0.0)
    return {**_common(hf), **_swiglu(hf), "moe_placement": "all",
            "moe": _moe(hf, hf["num_local_experts"], renormalize=True)}


def _olmoe(hf):
    _refuse(hf, clip_qkv=None)
    bias = bool(hf.get("attention_bias", False))
    return {**_common(hf), **_swiglu(hf), "qk_norm": True, "qkv_bias": bias, "attn_out_bias": bias,
            "moe_placement": "all",
            "moe": _moe(hf, hf["num_experts"], renormalize=bool(hf.get("norm_topk_prob", False)),
                        z_loss_weight=float(hf.get("router_z_loss_coef", 0.0)))}


def _qwen2_moe(hf):
    _refuse(hf, use_sliding_window=False)
    step, dense_only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    layers = [i for i in range(hf["num_hidden_layers"])
              if i not in dense_only and hf["num_experts"] > 0 and (i + 1) % step == 0]
    shared = hf.get("shared_expert_intermediate_size") or 0
    extra = {"num_shared_experts": 1, "shared_expert_hidden_dim": shared, "shared_expert_gate": True} if shared else {}
    return {**_common(hf), **_swiglu(hf), "qkv_bias": bool(hf.get("qkv_bias", True)), "moe_layers": layers,
            "moe_mlp_dim": hf["moe_intermediate_size"],
            "moe": _moe(hf, hf["num_experts"], renormalize=bool(hf.get("norm_topk_prob", False)), **extra)}


def _qwen(hf):
    """Qwen-1 (trust_remote_code): ``intermediate_size`` counts both halves of the gated MLP. Its
    ``use_dynamic_ntk`` / ``use_logn_attn`` only act on sequences longer than ``seq_length``; the zoo model does
    not apply them, so it matches within the trained context (``max_seq_len``) only."""
    return {"vocab_size": hf["vocab_size"], "dim": hf["hidden_size"], "depth": hf["num_hidden_layers"],
            "num_heads": hf["num_attention_heads"], "mlp_dim": hf["intermediate_size"] // 2, "fused_qkv": True,
            "qkv_bias": True, "norm_eps": float(hf.get("layer_norm_epsilon", 1e-6)),
            "rope_base": float(hf.get("rotary_emb_base", 10000.0)), "rotary_fraction": float(hf.get("rotary_pct", 1.0)),
            "max_seq_len": hf.get("seq_length", 8192), "tie_embeddings": False}


CONFIG_MAPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "llama": _llama, "qwen2": _qwen2, "stablelm": _stablelm, "phi": _phi, "mixtral": _mixtral, "olmoe": _olmoe,
    "qwen2_moe": _qwen2_moe, "qwen": _qwen}


def decoder_config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
    """The :class:`DecoderConfig` of a transformers ``config.json``."""
    model_type = hf.get("model_type")
    if model_type not in CONFIG_MAPS:
        raise HFCheckpointError(f"model_type {model_type!r} is not supported; supported: {sorted(CONFIG_MAPS)}")
    try:
        data = CONFIG_MAPS[model_type](hf)
    except KeyError as err:
        raise HFCheckpointError(f"{model_type} config.json lacks {err.args[0]!r}") from err
    try:
        return from_dict(DecoderConfig, data, where=f"DecoderConfig from {model_type} config.json")
    except ConfigError as err:
        raise HFCheckpointError(str(err)) from err


# --------------------------------------------------------------------------------------- weight maps
def _gated(src: TensorPool, prefix: str, gate: str, up: str, down: str) -> tuple[Tensor, Tensor]:
    """``(fc1 [2H, D] = [gate | up], fc2 [D, H])`` of a SwiGLU MLP stored as three linears under ``prefix``."""
    w1 = torch.cat([src.take(f"{prefix}.{gate}.weight"), src.take(f"{prefix}.{up}.weight")])
    return w1, src.take(f"{prefix}.{down}.weight")


def _experts(src: TensorPool, prefix: str, num_experts: int, names: tuple[str, str, str]) -> tuple[Tensor, Tensor]:
    """Stacked expert weights ``w1 [E, D, 2H]``, ``w2 [E, H, D]`` from per-expert linears (``prefix.e.name``) or from
    transformers 5's fused ``prefix.gate_up_proj [E, 2H, D]`` / ``prefix.down_proj [E, D, H]``."""
    if f"{prefix}.gate_up_proj" in src:
        return src.take(f"{prefix}.gate_up_proj").transpose(1, 2), src.take(f"{prefix}.down_proj").transpose(1, 2)
    pairs = [_gated(src, f"{prefix}.{e}", *names) for e in range(num_experts)]
    return torch.stack([w1.t() for w1, _ in pairs]), torch.stack([w2.t() for _, w2 in pairs])


def convert_state_dict(hf: dict[str, Any], tensors: Mapping[str, Tensor], cfg: DecoderConfig,
                       dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """Zoo decoder state dict from a transformers checkpoint's tensors (every tensor must be used); ``dtype``: cast
    floating-point tensors to it as they are read."""
    model_type = hf["model_type"]
    # old checkpoints stored rotary_emb.inv_freq; zoo recomputes it
    src = TensorPool(tensors, ignored_suffixes=("rotary_emb.inv_freq",), dtype=dtype)
    out: dict[str, Tensor] = {}
    qwen1 = model_type == "qwen"
    root, layer_fmt = ("transformer", "transformer.h.{}") if qwen1 else ("model", "model.layers.{}")
    out["embed.weight"] = src.take(f"{root}.wte.weight" if qwen1 else f"{root}.embed_tokens.weight")
    final_norm = {"qwen": "transformer.ln_f", "phi": "model.final_layernorm"}.get(model_type, "model.norm")
    src.take_linear(out, "norm", final_norm)
    if "lm_head.weight" in src or not cfg.tie_embeddings:
        src.take_linear(out, "lm_head", "lm_head", bias=cfg.lm_head_bias)
    else:  # tied: the checkpoint stores the matrix once
        out["lm_head.weight"] = out["embed.weight"]
    moe_at = set(cfg.moe_layer_indices)
    for i in range(cfg.depth):
        hf_l, z = layer_fmt.format(i), f"blocks.{i}"
        if qwen1:
            src.take_linear(out, f"{z}.attn_norm", f"{hf_l}.ln_1")
            src.take_linear(out, f"{z}.mlp_norm", f"{hf_l}.ln_2")
            src.take_linear(out, f"{z}.attn.qkv", f"{hf_l}.attn.c_attn")
            src.take_linear(out, f"{z}.attn.o_proj", f"{hf_l}.attn.c_proj")
            # Qwen-1's MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection.
            out[f"{z}.mlp.fc1.weight"], out[f"{z}.mlp.fc2.weight"] = _gated(src, f"{hf_l}.mlp", "w2", "w1", "c_proj")
            continue
        src.take_linear(out, f"{z}.attn_norm", f"{hf_l}.input_layernorm")
        if not cfg.parallel_residual:
            src.take_linear(out, f"{z}.mlp_norm", f"{hf_l}.post_attention_layernorm")
        attn = f"{hf_l}.self_attn"
        for proj in ("q_proj", "k_proj", "v_proj"):
            src.take_linear(out, f"{z}.attn.{proj}", f"{attn}.{proj}", bias=cfg.qkv_bias)
        src.take_linear(out, f"{z}.attn.o_proj", f"{attn}.dense" if model_type == "phi" else f"{attn}.o_proj",
                bias=cfg.attn_out_bias)
        if cfg.qk_norm:
            src.take_linear(out, f"{z}.attn.q_norm", f"{attn}.q_norm")
            src.take_linear(out, f"{z}.attn.k_norm", f"{attn}.k_norm")
        if i in moe_at:
            # Mixtral checkpoints name the block block_sparse_moe; transformers 5 models hold it as mlp.
            moe = f"{hf_l}.block_sparse_moe" if f"{hf_l}.block_sparse_moe.gate.weight" in src else f"{hf_l}.mlp"
            names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            out[f"{z}.mlp.router.proj.weight"] = src.take(f"{moe}.gate.weight")
            w1, w2 = _experts(src, f"{moe}.experts", cfg.moe.num_experts, names)
            out[f"{z}.mlp.experts.w1"], out[f"{z}.mlp.experts.w2"] = w1, w2
            if f"{moe}.shared_expert.gate_proj.weight" in src:
                w1s, w2s = _gated(src, f"{moe}.shared_expert", "gate_proj", "up_proj", "down_proj")
                out[f"{z}.mlp.shared_expert.fc1.weight"], out[f"{z}.mlp.shared_expert.fc2.weight"] = w1s, w2s
                out[f"{z}.mlp.shared_expert_gate.weight"] = src.take(f"{moe}.shared_expert_gate.weight")
        elif model_type == "phi":
            src.take_linear(out, f"{z}.mlp.fc1", f"{hf_l}.mlp.fc1", bias=True)
            src.take_linear(out, f"{z}.mlp.fc2", f"{hf_l}.mlp.fc2", bias=True)
        else:
            out[f"{z}.mlp.fc1.weight"], out[f"{z}.mlp.fc2.weight"] = _gated(src, f"{hf_l}.mlp", "gate_proj", "up_proj",
                                                                            "down_proj")
            if cfg.mlp_bias:
                out[f"{z}.mlp.fc1.bias"] = torch.cat([src.take(f"{hf_l}.mlp.gate_proj.bias"),
                                                      src.take(f"{hf_l}.mlp.up_proj.bias")])
                out[f"{z}.mlp.fc2.bias"] = src.take(f"{hf_l}.mlp.down_proj.bias")
    left = src.left()
    if left:
        raise HFCheckpointError(f"{len(left)} checkpoint tensor(s) have no place in the zoo model built from its "
                                f"config.json (e.g. {left[:4]}): config and weights do not match (num_hidden_layers, "
                                "MoE layers?) or the checkpoint has parts this converter does not know")
    return out


def load_hf_lm(folder: PathLike, dtype: Optional[torch.dtype] = None) -> DecoderLM:
    """A :class:`DecoderLM` (eval mode) holding the weights of the transformers checkpoint in ``folder``, in ``dtype``
    (default: the checkpoint's own precision, e.g. bf16 stays bf16). No float32 model is ever built: see the module
    docstring."""
    hf = read_hf_config(folder)
    weights = open_hf_weights(folder)  # headers only: tensors are read as they are converted
    cfg = decoder_config_from_hf(hf)
    dtype = dtype or main_dtype(weights) or torch.float32
    model = init_empty(lambda: DecoderLM(cfg))
    state = convert_state_dict(hf, weights, cfg, dtype=dtype)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise HFCheckpointError(f"the checkpoint gives no value for zoo parameter(s) {missing[:4]}; this zoo version "
                                "may lack a feature the checkpoint needs")
    for name, value in state.items():
        if name not in expected:
            raise HFCheckpointError(f"converted tensor {name!r} has no zoo parameter (converter bug)")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise HFCheckpointError(f"config/weights mismatch: zoo {name} expects shape {tuple(expected[name].shape)} "
                                    f"from config.json, the checkpoint's tensor has {tuple(value.shape)}")
    del expected
    return load_empty(model, state)


def convert_hf_lm(checkpoint: PathLike, out: PathLike, dtype: Optional[torch.dtype] = None) -> DecoderLM:
    """Convert ``checkpoint`` (a transformers folder) and write a zoo folder to ``out`` that
    ``zoo.create_model("local-dir:OUT")`` loads. ``dtype``: stored precision (default: the checkpoint's)."""
    from zoo.hub import save_pretrained

    model = load_hf_lm(checkpoint, dtype=dtype)
    save_pretrained(model, out, tag=f"converted from {Path(checkpoint).name}")
    return model
