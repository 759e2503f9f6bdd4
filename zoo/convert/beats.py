"""Official BEATs checkpoints (microsoft/unilm ``beats/``) -> :class:`zoo.models.beats.BEATsEncoder`.

An official ``.pt`` holds ``{"cfg": {...}, "model": state_dict}``; :func:`load_beats` takes that dict, or a bare
state dict (plus a :class:`BEATsConfig`, else the sizes are read off the tensors and the rest are the released
models' settings). Every tensor is mapped or named as unused (a fine-tuned model's ``predictor.*`` classifier);
anything else, or a missing tensor, is a :class:`BEATsCheckpointError` naming it.

Key map (official -> zoo):

- ``patch_embedding.weight`` -> ``patch_embed.weight``; ``layer_norm`` -> ``patch_norm``; ``post_extract_proj`` ->
  ``proj``
- ``encoder.pos_conv.0.{weight_g,weight_v,bias}`` -> ``pos_conv.{weight_g,weight_v,bias}``; ``encoder.layer_norm`` ->
  ``norm``
- ``encoder.layers.0.self_attn.relative_attention_bias.weight`` -> ``rel_pos_bias.weight`` (the official model
  shares layer 0's table with every layer, so ``layers.{i>0}`` copies must equal it and are dropped)
- ``encoder.layers.{i}.self_attn.{q,k,v,out}_proj`` -> ``blocks.{i}.attn.{q,k,v,out}_proj``,
  ``self_attn.grep_linear`` / ``grep_a`` -> ``attn.grep_linear`` / ``attn.grep_a``,
  ``self_attn_layer_norm`` -> ``norm1``, ``fc1`` / ``fc2`` -> ``mlp.fc1`` / ``mlp.fc2``, ``final_layer_norm`` -> ``norm2``
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from zoo.models.beats import BEATsConfig, BEATsEncoder

_FIXED = {
    "patch_embedding.weight": "patch_embed.weight",
    "patch_embedding.bias": "patch_embed.bias",
    "layer_norm.weight": "patch_norm.weight",
    "layer_norm.bias": "patch_norm.bias",
    "post_extract_proj.weight": "proj.weight",
    "post_extract_proj.bias": "proj.bias",
    "encoder.pos_conv.0.weight_g": "pos_conv.weight_g",
    "encoder.pos_conv.0.weight_v": "pos_conv.weight_v",
    "encoder.pos_conv.0.bias": "pos_conv.bias",
    "encoder.layer_norm.weight": "norm.weight",
    "encoder.layer_norm.bias": "norm.bias",
}
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_IN_LAYER = {
    "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
    "self_attn.out_proj": "attn.out_proj", "self_attn.grep_linear": "attn.grep_linear",
    "self_attn_layer_norm": "norm1", "fc1": "mlp.fc1", "fc2": "mlp.fc2", "final_layer_norm": "norm2",
}
_REL = "self_attn.relative_attention_bias.weight"


class BEATsCheckpointError(ValueError):
    """An official BEATs state dict that does not fit the model: names the tensors."""


def map_key(key: str) -> Optional[str]:
    """Official tensor name -> zoo name (None: a known unused tensor, e.g. a layer > 0's copy of the shared
    relative-position table); KeyError for an unknown name."""
    if key in _FIXED:
        return _FIXED[key]
    m = _LAYER.fullmatch(key)
    if m:
        i, rest = m.group(1), m.group(2)
        if rest == _REL:
            return "rel_pos_bias.weight" if i == "0" else None
        if rest == "self_attn.grep_a":
            return f"blocks.{i}.attn.grep_a"
        for prefix, target in _IN_LAYER.items():
            if rest.startswith(prefix + "."):
                return f"blocks.{i}.{target}{rest[len(prefix):]}"
    raise KeyError(key)


def infer_config(state_dict: Mapping[str, Tensor]) -> BEATsConfig:
    """Sizes from the tensors; ``deep_norm``, ``layer_norm_first`` and ``max_distance`` cannot be seen in the
    weights and take the released models' values (True, False, 800)."""
    sd = state_dict
    E, _, P, _ = sd["patch_embedding.weight"].shape
    D = sd["encoder.layer_norm.weight"].shape[0]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _LAYER.fullmatch(k)))
    v = sd["encoder.pos_conv.0.weight_v"]
    rel = sd.get(f"encoder.layers.0.{_REL}")
    grep = sd.get("encoder.layers.0.self_attn.grep_a")
    if rel is not None:
        heads = rel.shape[1]
    elif grep is not None:
        heads = grep.shape[1]
    else:
        raise BEATsCheckpointError("no relative position table nor gate: pass a BEATsConfig (head count unknown)")
    return BEATsConfig(
        input_patch_size=P, embed_dim=E, conv_bias="patch_embedding.bias" in sd, encoder_layers=layers,
        encoder_embed_dim=D, encoder_ffn_embed_dim=sd["encoder.layers.0.fc1.weight"].shape[0],
        encoder_attention_heads=heads, conv_pos=v.shape[2], conv_pos_groups=D // v.shape[1],
        relative_position_embedding=rel is not None, num_buckets=rel.shape[0] if rel is not None else 320,
        gru_rel_pos=grep is not None)


def convert_state_dict(state_dict: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], list]:
    """-> (zoo state dict, notes on dropped tensors)."""
    out: Dict[str, Tensor] = {}
    notes, unknown = [], []
    shared = state_dict.get(f"encoder.layers.0.{_REL}")
    for key, value in state_dict.items():
        if key.startswith("predictor."):
            notes.append(f"{key}: fine-tuned classifier head, not part of the encoder")
            continue
        try:
            target = map_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if target is None:
            if shared is None or value.shape != shared.shape or not torch.equal(value, shared):
                raise BEATsCheckpointError(f"{key} differs from encoder.layers.0.{_REL}; the official model shares "
                                           "one relative position table across layers")
            notes.append(f"{key}: copy of the shared layer-0 relative position table")
            continue
        out[target] = value
    if unknown:
        raise BEATsCheckpointError(f"unknown tensors in the BEATs state dict: {sorted(unknown)}")
    return out, notes


def load_beats(checkpoint: Mapping[str, Any], config: Optional[BEATsConfig] = None,
               strict: bool = True) -> BEATsEncoder:
    """An official checkpoint dict (``{"cfg", "model"}``) or a bare official state dict -> ``BEATsEncoder``
    (eval mode, float32 as stored)."""
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        state_dict = checkpoint["model"]
        if config is None and isinstance(checkpoint.get("cfg"), Mapping):
            config = BEATsConfig.from_official(checkpoint["cfg"])
    else:
        state_dict = checkpoint
    if config is None:
        config = infer_config(state_dict)
    mapped, _ = convert_state_dict(state_dict)
    model = BEATsEncoder(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    extra = sorted(set(mapped) - set(expected))
    bad_shape = sorted(f"{k}: {tuple(mapped[k].shape)} vs {tuple(expected[k].shape)}" for k in
                       set(mapped) & set(expected) if mapped[k].shape != expected[k].shape)
    if strict and (missing or extra or bad_shape):
        raise BEATsCheckpointError(f"BEATs checkpoint does not fit config {config}: missing {missing}, unexpected "
                                   f"{extra}, shape mismatch {bad_shape}")
    model.load_state_dict(mapped, strict=strict)
    return model.eval()


__all__ = ["load_beats", "convert_state_dict", "infer_config", "map_key", "BEATsCheckpointError"]
