"""Convert Google's official V-MoE checkpoints (``google-research/vmoe``) to a zoo V-MoE published folder.

    python -m zoo.convert vmoe --checkpoint PREFIX --out DIR [--preset NAME | --config official.json]
                               [--image-size N] [--capacity-factor CF] [--top-k K] [--group-size IMAGES]

The config comes from (first match): ``--config`` (the official ``VisionTransformerMoe`` kwargs, e.g. a JSON dump
of ``config.model``, or a file with them under ``model_kwargs``), ``--preset``, or the checkpoint itself (every
shape is in it; routing settings then default to the V-MoE paper configs: top-2, groups of 8 images, capacity
factor 1.05, no batch priority). ``--image-size`` converts for another resolution (position embeddings resized).

Parameter mapping (official Flax name -> ours):

    embedding/kernel [p,p,C,D] (HWIO)          -> patch_embed.proj.weight [D,C,p,p]
    cls [1,1,D]                                -> cls_token
    Encoder/posembed_input/pos_embedding       -> pos_embed (bilinearly resized for another grid)
    .../LayerNorm_0, LayerNorm_1 {scale,bias}  -> blocks.i.norm1, norm2 {weight,bias}
    .../SelfAttention/{query,key,value}/kernel [D,H,hd], bias [H,hd] -> attn.qkv (fused, q|k|v rows)
    .../SelfAttention/out/kernel [H,hd,D]      -> attn.proj.weight (= kernel.reshape(D,D).T)
    .../Mlp/Dense_{0,1}                        -> blocks.i.mlp.fc1, fc2 (kernels transposed)
    .../Moe/Router/dense/kernel [D,E]          -> blocks.i.mlp.router.proj.weight [E,D]
    .../Moe/Mlp/Dense_0/kernel [E,D,H], bias   -> blocks.i.mlp.experts.w1, b1 (stacked, as is)
    .../Moe/Mlp/Dense_1/kernel [E,H,D], bias   -> blocks.i.mlp.experts.w2, b2
    Encoder/encoder_norm                       -> encoder.norm
    pre_logits/{kernel,bias}                   -> pre_logits.0 (Dense + tanh)
    head/{kernel,bias}                         -> head

Every checkpoint parameter must be consumed and every model parameter produced; anything else is an error.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from zoo.config import ConfigError, from_dict, merge, to_dict
from zoo.convert.vmoe_checkpoint import PathLike, VMoECheckpointError, read_checkpoint
from zoo.models.vmoe import VMoE, VMoEConfig

logger = logging.getLogger("zoo.convert")

# The checkpoints google-research/vmoe publishes (README "Checkpoints"), with the settings of their configs that
# the weights do not carry. Prefix: gs://vmoe_checkpoints/<name>.
PUBLISHED = {
    "vmoe_s32_last2_ilsvrc2012_randaug_light1": dict(
        description="V-MoE S/32, 8 experts on the last two odd blocks, ILSVRC2012 from scratch, RandAugment, "
                    "300 epochs (224px)", image_size=224, top_k=2, capacity_factor=4.0,
        note="the official config evaluates with capacity_factor=4.0 (model_overrides)"),
    "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012": dict(
        description="V-MoE S/32 light1, fine-tuned on ILSVRC2012 at 384px", image_size=384, top_k=2,
        capacity_factor=1.5),
    "vmoe_s32_last2_ilsvrc2012_randaug_medium": dict(
        description="V-MoE S/32, 8 experts on the last two odd blocks, ILSVRC2012 from scratch, RandAugment, "
                    "1000 epochs (224px)", image_size=224, top_k=2, capacity_factor=1.05),
    "vmoe_b16_imagenet21k_randaug_strong": dict(
        description="V-MoE B/16, 8 experts on every odd block, ImageNet-21k from scratch, RandAugment (224px, "
                    "21843 classes)", image_size=224, top_k=2, capacity_factor=1.05),
    "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012": dict(
        description="V-MoE B/16 ImageNet-21k, fine-tuned on ILSVRC2012 at 384px", image_size=384, top_k=2,
        capacity_factor=1.5),
}
UNSUPPORTED_PUBLISHED = {
    "eee_s32_last2_ilsvrc2012": "E^3 (efficient ensemble of experts, vit_moe_ensemble) is another architecture",
    "eee_s32_last2_ilsvrc2012_ft_cifar100": "E^3 (efficient ensemble of experts, vit_moe_ensemble) is another "
                                            "architecture",
}
# V-MoE input pipeline: value_range(-1, 1).
OFFICIAL_INPUT = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "value_range": [-1, 1]}

_BLOCK = re.compile(r"^Encoder/encoderblock_(\d+)/(.+)$")


# --------------------------------------------------------------------------------------------- config
def _get(d: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return d[key] if key in d and d[key] is not None else default


def config_from_official(kwargs: Mapping[str, Any], *, image_size: Optional[int] = None,
                         in_chans: int = 3) -> VMoEConfig:
    """Official ``VisionTransformerMoe`` kwargs (``config.model``) -> :class:`VMoEConfig`.

    Names: hidden_size -> encoder.dim, encoder.num_layers -> depth, moe.layers -> moe_layers,
    router.num_selected_experts -> top_k, dispatcher.capacity_factor / batch_priority / capacity_multiple_of,
    moe.group_size (TOKENS) -> group_size (IMAGES = tokens / sequence length). Settings without a zoo
    counterpart that change the forward pass raise; training-only ones are accepted and ignored.
    """
    kw = dict(kwargs.get("model_kwargs", kwargs))
    image = image_size or kwargs.get("image_size")
    if isinstance(image, (list, tuple)):
        image = image[0]
    if image is None:
        raise ConfigError("the official config does not say the image size; pass image_size / --image-size")
    known_top = {"name", "num_classes", "patch_size", "hidden_size", "encoder", "classifier", "representation_size",
                 "deterministic", "head_bias_init", "head_kernel_zero_init"}
    unknown = set(kw) - known_top
    if unknown:
        raise ConfigError(f"official config: unsupported key(s) {sorted(unknown)}; known: {sorted(known_top)}")
    if kw.get("name", "VisionTransformerMoe") != "VisionTransformerMoe":
        raise ConfigError(f"official model {kw['name']!r} is not VisionTransformerMoe (E^3 / other models are "
                          "not supported)")
    patch = kw["patch_size"]
    patch = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
    if patch[0] != patch[1]:
        raise ConfigError(f"non-square patches {patch} are not supported")
    classifier = kw.get("classifier", "token")
    if classifier == "0":
        classifier = "token"
    if classifier not in ("token", "gap"):
        raise ConfigError(f"classifier {classifier!r} is not supported (zoo V-MoE has 'token' and 'gap'; "
                          "'map' attention pooling is not implemented)")
    enc = dict(kw["encoder"])
    known_enc = {"num_layers", "mlp_dim", "num_heads", "dropout_rate", "attention_dropout_rate", "moe",
                 "attention_qk_norm", "position_emb", "dtype"}
    unknown = set(enc) - known_enc
    if unknown:
        raise ConfigError(f"official encoder config: unsupported key(s) {sorted(unknown)}")
    if enc.get("attention_qk_norm"):
        raise ConfigError("attention_qk_norm=True is not supported by the zoo V-MoE")
    pos = enc.get("position_emb") or {}
    if pos.get("name", "learned") != "learned":
        raise ConfigError(f"position embedding {pos.get('name')!r} is not supported (only 'learned')")
    moe = dict(enc.get("moe") or {})
    router = dict(moe.pop("router", None) or {})
    dispatcher = dict(router.pop("dispatcher", None) or {})
    known_moe = {"layers", "num_experts", "group_size", "dropout_rate", "split_rngs", "dtype"}
    unknown = set(moe) - known_moe
    if unknown:
        raise ConfigError(f"official moe config: unsupported key(s) {sorted(unknown)}")
    rname = router.pop("name", "NoisyTopExpertsPerItemRouter")
    if rname != "NoisyTopExpertsPerItemRouter":
        raise ConfigError(f"router {rname!r} is not supported (only NoisyTopExpertsPerItemRouter)")
    known_router = {"num_selected_experts", "noise_std", "gshard_loss_weight", "importance_loss_weight",
                    "load_loss_weight", "deterministic", "dtype"}
    unknown = set(router) - known_router
    if unknown:
        raise ConfigError(f"official router config: unsupported key(s) {sorted(unknown)}")
    known_disp = {"name", "capacity_factor", "batch_priority", "bfloat16", "capacity_ceil_or_round",
                  "capacity_multiple_of", "partition_spec", "einsum_precision", "capacity"}
    unknown = set(dispatcher) - known_disp
    if unknown:
        raise ConfigError(f"official dispatcher config: unsupported key(s) {sorted(unknown)}")
    if dispatcher.get("capacity") is not None:
        raise ConfigError("a fixed dispatcher 'capacity' is not supported; use capacity_factor")
    if dispatcher.get("capacity_ceil_or_round", "ceil") != "ceil":
        raise ConfigError("capacity_ceil_or_round='round' is not supported (zoo rounds capacity up)")
    if dispatcher.get("name", "einsum") not in ("einsum", "indices"):
        raise ConfigError(f"dispatcher {dispatcher['name']!r} is not supported")
    if dispatcher.get("bfloat16"):
        logger.info("official dispatcher bfloat16=True: zoo dispatches in the model dtype (fp32 here)")
    if router.get("gshard_loss_weight"):
        logger.warning("gshard_loss_weight=%s is a training loss with no zoo equivalent; ignored",
                       router["gshard_loss_weight"])
    grid = image // patch[0]
    seq_len = grid * grid + (1 if classifier == "token" else 0)
    group_tokens = moe.get("group_size")
    group_images: Optional[int] = None
    if group_tokens is not None:
        if group_tokens % seq_len:
            raise ConfigError(f"official group_size={group_tokens} tokens is not a whole number of images of "
                              f"{seq_len} tokens at image_size={image}; zoo groups whole images: pass "
                              "--group-size IMAGES")
        group_images = group_tokens // seq_len
    multiple = dispatcher.get("capacity_multiple_of", 4)
    data = {
        "image_size": int(image), "patch_size": int(patch[0]), "in_chans": int(in_chans),
        "num_classes": int(kw["num_classes"]), "classifier": classifier,
        "representation_size": kw.get("representation_size"),
        "head_bias_init": float(_get(kw, "head_bias_init", 0.0)),
        "encoder": {
            "dim": int(kw["hidden_size"]), "depth": int(enc["num_layers"]), "num_heads": int(enc["num_heads"]),
            "mlp_dim": int(enc["mlp_dim"]), "activation": "gelu_tanh", "norm_eps": 1e-6,
            "dropout": float(_get(enc, "dropout_rate", 0.0)),
            "attn_dropout": float(_get(enc, "attention_dropout_rate", 0.0)),
            "moe_layers": [int(i) for i in moe.get("layers", ())],
            "moe": {
                "num_experts": int(moe.get("num_experts", 1)),
                "top_k": int(_get(router, "num_selected_experts", 1)),
                "noise_std": float(_get(router, "noise_std", 1.0)),
                "renormalize": False, "router": "topk",
                "batch_priority": bool(dispatcher.get("batch_priority", False)),
                "capacity_factor": float(dispatcher["capacity_factor"]) if "capacity_factor" in dispatcher else 1.0,
                "capacity_multiple_of": int(multiple or 0),
                "group_size": group_images,
                "activation": "gelu_tanh", "expert_bias": True,
                "importance_loss_weight": float(_get(router, "importance_loss_weight", 1.0)),
                "load_loss_weight": float(_get(router, "load_loss_weight", 1.0)),
            },
        },
    }
    if not moe.get("layers"):
        data["encoder"]["moe_layers"] = []
    return from_dict(VMoEConfig, data, where="config from the official V-MoE config")


def config_from_checkpoint(params: Mapping[str, np.ndarray], *, image_size: Optional[int] = None,
                           top_k: int = 2, capacity_factor: float = 1.05, group_size: Optional[int] = 8,
                           batch_priority: bool = False) -> VMoEConfig:
    """Everything the weights say (sizes, depth, heads, MoE placement, classes, pre-logits, resolution); routing
    settings the weights do not carry come from the arguments (defaults: V-MoE paper configs)."""
    def shape(name: str) -> tuple[int, ...]:
        if name not in params:
            raise VMoECheckpointError(f"checkpoint has no {name!r}: not a VisionTransformerMoe checkpoint "
                                      f"(has e.g. {sorted(params)[:6]})")
        return tuple(params[name].shape)

    p, _, c, d = shape("embedding/kernel")
    blocks = sorted({int(m.group(1)) for m in map(_BLOCK.match, params) if m})
    if not blocks or blocks != list(range(len(blocks))):
        raise VMoECheckpointError(f"encoder blocks {blocks} are not 0..N-1")
    moe_layers = [b for b in blocks if f"Encoder/encoderblock_{b}/Moe/Router/dense/kernel" in params]
    q = shape("Encoder/encoderblock_0/SelfAttention/query/kernel")
    if moe_layers:
        e, _, mlp = shape(f"Encoder/encoderblock_{moe_layers[0]}/Moe/Mlp/Dense_0/kernel")
    else:
        e, mlp = 1, shape("Encoder/encoderblock_0/Mlp/Dense_0/kernel")[1]
    classifier = "token" if "cls" in params else "gap"
    if any(k.startswith("MapHead/") for k in params):
        raise VMoECheckpointError("classifier 'map' (MapHead) is not supported")
    n_pos = shape("Encoder/posembed_input/pos_embedding")[1] - (1 if classifier == "token" else 0)
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise VMoECheckpointError(f"position embedding of {n_pos} patch tokens is not a square grid")
    rep = shape("pre_logits/kernel")[1] if "pre_logits/kernel" in params else None
    data = {
        "image_size": int(image_size or grid * p), "patch_size": int(p), "in_chans": int(c),
        "num_classes": int(shape("head/kernel")[1]), "classifier": classifier, "representation_size": rep,
        "encoder": {"dim": int(d), "depth": len(blocks), "num_heads": int(q[1]), "mlp_dim": int(mlp),
                    "activation": "gelu_tanh", "norm_eps": 1e-6, "moe_layers": moe_layers,
                    "moe": {"num_experts": int(e), "top_k": min(top_k, int(e)), "capacity_factor": capacity_factor,
                            "group_size": group_size, "batch_priority": batch_priority, "renormalize": False,
                            "activation": "gelu_tanh", "expert_bias": True, "capacity_multiple_of": 4}},
    }
    return from_dict(VMoEConfig, data, where="config inferred from the checkpoint")


# ------------------------------------------------------------------------------------------ parameters
def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32)


def map_vmoe_params(params: Mapping[str, np.ndarray], config: VMoEConfig) -> dict[str, torch.Tensor]:
    """Official flat params -> our state dict (fp32). Raises on unknown official parameters; shapes are checked
    when the state dict is loaded into the model."""
    if any(k.startswith("params/") for k in params):  # a whole train state: keep the parameters
        dropped = sorted({k.split("/", 1)[0] for k in params if not k.startswith("params/")})
        if dropped:
            logger.info("train-state checkpoint: ignoring %s", dropped)
        params = {k[len("params/"):]: v for k, v in params.items() if k.startswith("params/")}
    sd: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in params:
            raise VMoECheckpointError(f"checkpoint is missing {name!r}, needed for the configured model "
                                      f"(depth={config.encoder.depth}, moe_layers={config.encoder.moe_layer_indices}, "
                                      f"classifier={config.classifier!r}, representation_size="
                                      f"{config.representation_size})")
        used.add(name)
        return np.asarray(params[name], dtype=np.float32)

    def dense(src: str, dst: str) -> None:
        sd[f"{dst}.weight"] = _t(take(f"{src}/kernel").T)
        sd[f"{dst}.bias"] = _t(take(f"{src}/bias"))

    def norm(src: str, dst: str) -> None:
        sd[f"{dst}.weight"] = _t(take(f"{src}/scale"))
        sd[f"{dst}.bias"] = _t(take(f"{src}/bias"))

    kernel = take("embedding/kernel")  # [p, p, C, D] HWIO
    sd["patch_embed.proj.weight"] = _t(kernel.transpose(3, 2, 0, 1))
    sd["patch_embed.proj.bias"] = _t(take("embedding/bias"))
    if config.classifier == "token":
        sd["cls_token"] = _t(take("cls"))
    sd["pos_embed"] = _t(take("Encoder/posembed_input/pos_embedding"))
    moe_at = set(config.encoder.moe_layer_indices)
    for i in range(config.encoder.depth):
        src, dst = f"Encoder/encoderblock_{i}", f"encoder.blocks.{i}"
        norm(f"{src}/LayerNorm_0", f"{dst}.norm1")
        norm(f"{src}/LayerNorm_1", f"{dst}.norm2")
        att = f"{src}/SelfAttention"
        qkv_w, qkv_b = [], []
        for part in ("query", "key", "value"):
            k = take(f"{att}/{part}/kernel")  # [D, heads, head_dim]
            qkv_w.append(k.reshape(k.shape[0], -1).T)
            qkv_b.append(take(f"{att}/{part}/bias").reshape(-1))
        sd[f"{dst}.attn.qkv.weight"] = _t(np.concatenate(qkv_w, 0))
        sd[f"{dst}.attn.qkv.bias"] = _t(np.concatenate(qkv_b, 0))
        out = take(f"{att}/out/kernel")  # [heads, head_dim, D]
        sd[f"{dst}.attn.proj.weight"] = _t(out.reshape(-1, out.shape[-1]).T)
        sd[f"{dst}.attn.proj.bias"] = _t(take(f"{att}/out/bias"))
        if i in moe_at:
            moe = f"{src}/Moe"
            sd[f"{dst}.mlp.router.proj.weight"] = _t(take(f"{moe}/Router/dense/kernel").T)
            sd[f"{dst}.mlp.experts.w1"] = _t(take(f"{moe}/Mlp/Dense_0/kernel"))
            sd[f"{dst}.mlp.experts.b1"] = _t(take(f"{moe}/Mlp/Dense_0/bias"))
            sd[f"{dst}.mlp.experts.w2"] = _t(take(f"{moe}/Mlp/Dense_1/kernel"))
            sd[f"{dst}.mlp.experts.b2"] = _t(take(f"{moe}/Mlp/Dense_1/bias"))
        else:
            dense(f"{src}/Mlp/Dense_0", f"{dst}.mlp.fc1")
            dense(f"{src}/Mlp/Dense_1", f"{dst}.mlp.fc2")
    norm("Encoder/encoder_norm", "encoder.norm")
    if config.representation_size:
        dense("pre_logits", "pre_logits.0")
    dense("head", "head")
    unknown = sorted(set(params) - used)
    if unknown:
        raise VMoECheckpointError(
            f"{len(unknown)} checkpoint parameter(s) have no place in the configured model: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''} (model: depth={config.encoder.depth}, "
            f"moe_layers={config.encoder.moe_layer_indices}, representation_size={config.representation_size}); "
            "check --preset/--config, or the checkpoint is not a VisionTransformerMoe")
    return sd


def vit_zoom_pos_embed(pos: np.ndarray, new_grid: int, num_prefix_tokens: int = 1) -> np.ndarray:
    """Resize ``[1, prefix + g*g, D]`` like the official ``vit_zoom`` initialisation rule
    (``scipy.ndimage.zoom(order=1)`` on the grid, prefix token kept): bilinear with ``align_corners=True``.
    ``zoo.layers.resize_pos_embed`` (the zoo default) uses ``align_corners=False``."""
    prefix, grid = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    g = math.isqrt(grid.shape[1])
    if g * g != grid.shape[1]:
        raise VMoECheckpointError(f"position embedding grid of {grid.shape[1]} tokens is not square")
    if g == new_grid:
        return pos
    t = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32)).reshape(1, g, g, -1).permute(0, 3, 1, 2)
    t = torch.nn.functional.interpolate(t, size=(new_grid, new_grid), mode="bilinear", align_corners=True)
    out = t.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).numpy()
    return np.concatenate([prefix.astype(np.float32), out], axis=1)


# ---------------------------------------------------------------------------------------------- convert
def load_official_config(path: PathLike) -> dict[str, Any]:
    """The mapping in a JSON (or ``.yaml`` / ``.yml``) config file; a :class:`ConfigError` naming the file if it is
    missing, unparsable or not a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the official config.model kwargs as JSON/YAML, "
                          "or use --preset")
    try:
        data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path} could not be parsed: {err}") from err
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of model kwargs, found {type(data).__name__}")
    return dict(data)


def convert_vmoe(checkpoint: PathLike, out: Optional[PathLike] = None, *, preset: Optional[str] = None,
                 config: Union[None, PathLike, Mapping[str, Any], VMoEConfig] = None,
                 image_size: Optional[int] = None, overrides: Optional[Mapping[str, Any]] = None,
                 top_k: Optional[int] = None, capacity_factor: Optional[float] = None,
                 group_size: Optional[int] = None, batch_priority: Optional[bool] = None,
                 tag: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None,
                 pos_embed_resize: str = "zoo") -> VMoE:
    """Read an official checkpoint, build the zoo model, load the mapped weights (strict) and, if ``out`` is given,
    write a published folder that ``zoo.create_model("local-dir:OUT")`` loads. Returns the model (eval mode).

    ``pos_embed_resize`` for another resolution: ``"zoo"`` = :func:`zoo.layers.resize_pos_embed` (bilinear,
    align_corners=False), ``"vmoe"`` = as the official ``vit_zoom`` rule (scipy zoom order 1 = align_corners=True).
    """
    if pos_embed_resize not in ("zoo", "vmoe"):
        raise ConfigError(f"pos_embed_resize must be 'zoo' or 'vmoe', got {pos_embed_resize!r}")
    from zoo import hub
    from zoo.checkpoint import load_state_dict_checked
    from zoo.registry import model_config

    name = Path(str(checkpoint)).name
    known = PUBLISHED.get(name, {})
    if name in UNSUPPORTED_PUBLISHED:
        raise ConfigError(f"{name}: {UNSUPPORTED_PUBLISHED[name]}; not convertible to a zoo V-MoE")
    # the cheap arguments first: a typo in the preset or config file should not wait for (or hide behind) the checkpoint
    if preset is not None:
        model_config(preset)
    if config is not None and not isinstance(config, (Mapping, VMoEConfig)):
        config = load_official_config(config)
    params = read_checkpoint(checkpoint)
    in_chans = int(params["embedding/kernel"].shape[2]) if "embedding/kernel" in params else 3
    routing = {k: v for k, v in {"encoder.moe.top_k": top_k, "encoder.moe.capacity_factor": capacity_factor,
                                 "encoder.moe.group_size": group_size,
                                 "encoder.moe.batch_priority": batch_priority}.items() if v is not None}
    extra = dict(overrides or {})
    if image_size:
        extra["image_size"] = image_size
    if isinstance(config, VMoEConfig):
        cfg = from_dict(VMoEConfig, merge(to_dict(config), {**extra, **routing}))
    elif config is not None:
        raw = config if isinstance(config, Mapping) else load_official_config(config)
        if "family" in raw:  # a zoo config.json
            data = {k: v for k, v in raw.items() if k != "family"}
            cfg = from_dict(VMoEConfig, merge(data, {**extra, **routing}))
        else:
            # the group size (in tokens) is converted to images at the checkpoint's own resolution
            native = config_from_official(raw, image_size=_checkpoint_image_size(params), in_chans=in_chans)
            cfg = from_dict(VMoEConfig, merge(to_dict(native), {**extra, **routing}))
    elif preset:
        cfg = model_config(preset, **merge(extra, routing))
    else:
        cfg = config_from_checkpoint(
            params, top_k=top_k or known.get("top_k", 2),
            capacity_factor=capacity_factor or known.get("capacity_factor", 1.05),
            group_size=group_size if group_size is not None else 8,
            batch_priority=bool(batch_priority) if batch_priority is not None else False)
        if extra:
            cfg = from_dict(VMoEConfig, merge(to_dict(cfg), extra))
    model = VMoE(cfg).eval()
    pos_key = "Encoder/posembed_input/pos_embedding"
    if pos_embed_resize == "vmoe" and pos_key in params:
        params = dict(params)
        params[pos_key] = vit_zoom_pos_embed(params[pos_key], cfg.image_size // cfg.patch_size,
                                             1 if cfg.classifier == "token" else 0)
    sd = map_vmoe_params(params, cfg)
    load_state_dict_checked(model, sd, source=f"official V-MoE checkpoint {checkpoint}")
    if out is not None:
        recipe = {"converted_from": str(checkpoint), "official_code": "google-research/vmoe"}
        if known.get("description"):
            recipe["description"] = known["description"]
        if known.get("note"):
            recipe["note"] = known["note"]
        hub.save_pretrained(model, out, preset=preset, tag=tag, metrics=metrics, recipe=recipe,
                            input={"size": [cfg.in_chans, cfg.image_size, cfg.image_size], **OFFICIAL_INPUT},
                            license="apache-2.0")
    return model


def _checkpoint_image_size(params: Mapping[str, np.ndarray]) -> Optional[int]:
    try:
        p = params["embedding/kernel"].shape[0]
        n = params["Encoder/posembed_input/pos_embedding"].shape[1] - (1 if "cls" in params else 0)
    except KeyError:
        return None
    g = math.isqrt(n)
    return g * p if g * g == n else None
