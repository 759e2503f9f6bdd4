"""Hugging Face CLIP / SigLIP vision towers -> :class:`zoo.models.towers.VisionTower` (transformers not needed).

A folder holds ``config.json`` (a full ``CLIPConfig`` / ``SiglipConfig`` with a ``vision_config``, or a
``CLIPVisionConfig`` / ``SiglipVisionConfig``) and weights in any layout :mod:`zoo.convert.hf_files` reads. Vision
tensors are named ``vision_model.<name>`` (full models, and vision models saved by transformers 4) or ``<name>``
(vision models saved by transformers 5). Every vision tensor is mapped into the tower or is one of the named unused
parts (SigLIP's attention-pooling ``head.*``, a stored ``embeddings.position_ids`` buffer); tensors outside the vision
model must be the other tower or the contrastive head (``text_model.*``, ``text_projection``, ``visual_projection``,
``logit_scale``, ``logit_bias``). Anything else is an error naming the tensor.

Key map (``<name>`` -> tower):

- ``embeddings.patch_embedding.{weight,bias}`` -> ``patch_embed.proj`` (CLIP has no bias)
- ``embeddings.class_embedding`` ``[D]`` -> ``cls_token`` ``[1, 1, D]`` (CLIP)
- ``embeddings.position_embedding.weight`` ``[P + N, D]`` -> ``pos_embed`` ``[1, P + N, D]``
- ``pre_layrnorm`` -> ``pre_norm`` (CLIP; transformers' spelling)
- ``encoder.layers.{i}.self_attn.{q,k,v}_proj`` -> ``encoder.blocks.{i}.attn.qkv`` (concatenated q, k, v: the zoo
  attention's fused projection), ``self_attn.out_proj`` -> ``attn.proj``, ``layer_norm1/2`` -> ``norm1/2``,
  ``mlp.fc1/fc2`` -> ``mlp.fc1/fc2``
- ``post_layernorm`` -> ``encoder.norm`` (held, never applied to features)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor

from zoo.convert.hf_files import HFCheckpointError, TensorPool, find_hf_folder, read_hf_weights, read_json
from zoo.models.towers import VisionTower, VisionTowerConfig

PathLike = Union[str, Path]

# transformers' config defaults (a config.json omits keys equal to them, e.g. google/siglip-so400m-patch14-384
# stores no hidden_act / layer_norm_eps) and each layout's front end.
_VISION_TYPES: dict[str, dict[str, Any]] = {
    "clip_vision_model": {
        "defaults": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                     "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        "layout": {"class_token": True, "pre_norm": True, "patch_bias": False},
    },
    "siglip_vision_model": {
        "defaults": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 16,
                     "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
        "layout": {"class_token": False, "pre_norm": False, "patch_bias": True},
    },
}
_FULL_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}  # full model -> its vision config
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_new": "gelu_tanh"}
_VISION_PREFIX = "vision_model."
# Parts of a full CLIP / SigLIP checkpoint that are not the vision tower (text tower, contrastive head).
_NON_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")


def _vision_part(hf_config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(vision model_type, the vision config dict) of a full or a vision-only config."""
    model_type = hf_config.get("model_type")
    known = sorted(_VISION_TYPES) + sorted(_FULL_TYPES)
    if model_type in _VISION_TYPES:
        return model_type, dict(hf_config)
    if model_type in _FULL_TYPES:
        vision = dict(hf_config.get("vision_config") or {})
        vision.update(hf_config.get("vision_config_dict") or {})  # legacy key; transformers lets it win
        if not vision:
            raise HFCheckpointError(f"a {model_type!r} config.json must have a 'vision_config' section")
        inner = vision.get("model_type", _FULL_TYPES[model_type])
        if inner != _FULL_TYPES[model_type]:
            raise HFCheckpointError(f"{model_type!r} config has a vision_config of model_type {inner!r}, expected "
                                    f"{_FULL_TYPES[model_type]!r}")
        return _FULL_TYPES[model_type], vision
    raise HFCheckpointError(f"config.json has model_type {model_type!r}, which is not a CLIP or SigLIP model; the "
                            f"vision-tower converter reads model_type {known}")


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise HFCheckpointError(f"only square {name} is supported, got {value}")
        value = value[0]
    return int(value)


def vision_config_from_hf(hf_config: Mapping[str, Any], *, feature_layer: int = -2,
                          select: str = "patch") -> VisionTowerConfig:
    """A :class:`VisionTowerConfig` from a CLIP / SigLIP ``config.json`` dict (full model or vision model)."""
    vision_type, vision = _vision_part(hf_config)
    spec = _VISION_TYPES[vision_type]
    values = {**spec["defaults"], **{k: v for k, v in vision.items() if v is not None}}
    act = values["hidden_act"]
    if act not in _HF_ACTIVATIONS:
        raise HFCheckpointError(f"{vision_type} hidden_act {act!r} is not supported; supported: "
                                f"{sorted(_HF_ACTIVATIONS)}")
    return VisionTowerConfig(
        image_size=_square(values["image_size"], "image_size"), patch_size=_square(values["patch_size"], "patch_size"),
        in_chans=int(values["num_channels"]), dim=int(values["hidden_size"]), depth=int(values["num_hidden_layers"]),
        num_heads=int(values["num_attention_heads"]), mlp_dim=int(values["intermediate_size"]),
        activation=_HF_ACTIVATIONS[act], norm_eps=float(values["layer_norm_eps"]), **spec["layout"],
        feature_layer=feature_layer, select=select)


def hf_vision_state_dict(tensors: Mapping[str, Tensor], config: VisionTowerConfig,
                         prefix: str = "") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Map the vision tensors named ``prefix + <name>`` (see the module docstring) to a tower state dict.

    Returns ``(state, sources)``: ``sources[tower name]`` = the checkpoint tensor(s) it came from. Tensors outside
    ``prefix`` are not looked at (a multimodal checkpoint passes e.g. its tower's prefix); under it, every tensor
    must be mapped or a named unused part, else HFCheckpointError.
    """
    pool = TensorPool({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    state: dict[str, Tensor] = {}
    sources: dict[str, str] = {}

    def take(zoo_name: str, hf_name: str, reshape: Optional[tuple[int, ...]] = None) -> None:
        value = pool.take(hf_name)
        state[zoo_name] = value.reshape(reshape) if reshape is not None else value
        sources[zoo_name] = prefix + hf_name

    D = config.dim
    take("patch_embed.proj.weight", "embeddings.patch_embedding.weight")
    if config.patch_bias:
        take("patch_embed.proj.bias", "embeddings.patch_embedding.bias")
    if config.class_token:
        name = "embeddings.class_embedding"
        if name in pool and pool.tensors[name].numel() != D:
            raise HFCheckpointError(f"{prefix}{name} has shape {tuple(pool.tensors[name].shape)}, expected ({D},)")
        take("cls_token", name, (1, 1, D))
    pos = "embeddings.position_embedding.weight"
    take("pos_embed", pos, (1, *pool.tensors[pos].shape) if pos in pool else None)
    if config.pre_norm:
        for p in ("weight", "bias"):
            take(f"pre_norm.{p}", f"pre_layrnorm.{p}")
    for i in range(config.depth):
        ours, theirs = f"encoder.blocks.{i}", f"encoder.layers.{i}"
        for p in ("weight", "bias"):
            qkv = [pool.take(f"{theirs}.self_attn.{x}_proj.{p}") for x in "qkv"]
            state[f"{ours}.attn.qkv.{p}"] = torch.cat(qkv, dim=0)
            sources[f"{ours}.attn.qkv.{p}"] = f"{prefix}{theirs}.self_attn.{{q,k,v}}_proj.{p}"
            for zoo_part, hf_part in (("attn.proj", "self_attn.out_proj"), ("norm1", "layer_norm1"),
                                      ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                take(f"{ours}.{zoo_part}.{p}", f"{theirs}.{hf_part}.{p}")
    for p in ("weight", "bias"):
        take(f"encoder.norm.{p}", f"post_layernorm.{p}")

    # Named unused parts: the SigLIP attention-pooling head (pools the post-layernorm output, which the features
    # never are) and the position_ids buffer older transformers stored (arange, rebuilt by every model).
    for name in list(pool.tensors):
        if name.startswith("head.") or name == "embeddings.position_ids":
            pool.take(name)
    extra = pool.left()
    if extra:
        depth_hint = [n for n in extra if n.startswith("encoder.layers.")]
        hint = (f"; the weights have more blocks than the config's num_hidden_layers={config.depth}"
                if depth_hint else "")
        raise HFCheckpointError(f"{len(extra)} vision tensor(s) the converter does not know: "
                                f"{[prefix + n for n in extra[:6]]}{hint}")
    return state, sources


def split_hf_vision_tensors(tensors: Mapping[str, Tensor]) -> tuple[str, list[str]]:
    """``(vision prefix, ignored non-vision names)`` of a CLIP / SigLIP folder's tensors: the prefix is
    ``"vision_model."`` when any tensor has it, else ``""``. A tensor that is neither vision (under the prefix) nor a
    known non-vision part (text tower, projections, logit scale / bias) is an error."""
    prefix = _VISION_PREFIX if any(k.startswith(_VISION_PREFIX) for k in tensors) else ""
    ignored, unknown = [], []
    for name in tensors:
        if name.startswith(_NON_VISION):
            ignored.append(name)
        elif not name.startswith(prefix):
            unknown.append(name)
    if unknown:
        raise HFCheckpointError(f"tensor(s) {sorted(unknown)[:6]} are neither under {prefix!r} (the vision model) nor "
                                f"a known non-vision part {list(_NON_VISION)}; is this a CLIP / SigLIP checkpoint?")
    return prefix, sorted(ignored)


def vision_tower_from_hf(folder_or_name: PathLike, feature_layer: int = -2, select: str = "patch", *,
                         dtype: Optional[torch.dtype] = None, search_dirs: Iterable[PathLike] = (),
                         cache_dir: Optional[PathLike] = None) -> VisionTower:
    """A :class:`VisionTower` from a Hugging Face CLIP / SigLIP folder, or a hub name resolved OFFLINE with
    :func:`zoo.convert.hf_files.find_hf_folder` (``search_dirs``, then the Hugging Face cache; never downloads).

    ``feature_layer`` / ``select``: see :class:`VisionTowerConfig` (MoE-LLaVA: -2, ``"patch"``). ``dtype``: cast
    the tower (default: keep float32, whatever the file's dtype). Errors (HFCheckpointError) name what is wrong: a
    model_type that is not CLIP / SigLIP, a missing tensor, an unknown tensor, a shape that does not fit the config.
    """
    folder = find_hf_folder(folder_or_name, cache_dir=cache_dir, search_dirs=search_dirs)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; expected a Hugging Face CLIP / SigLIP folder")
    hf_config = read_json(folder / "config.json")
    if not isinstance(hf_config, dict):
        raise HFCheckpointError(f"{folder / 'config.json'} must hold a JSON object")
    config = vision_config_from_hf(hf_config, feature_layer=feature_layer, select=select)  # before reading weights
    tensors = read_hf_weights(folder)
    prefix, _ = split_hf_vision_tensors(tensors)
    state, sources = hf_vision_state_dict(tensors, config, prefix)
    tower = VisionTower(config)
    try:
        tower.load_converted(state, sources)
    except ValueError as err:
        raise HFCheckpointError(f"{folder}: {err}") from err
    return tower.to(dtype) if dtype is not None else tower
