"""Official MoE-LLaVA checkpoints (``LanguageBind/MoE-LLaVA-*``, PKU-YuanGroup/MoE-LLaVA) -> zoo ``moe_llava`` folders.

    python -m zoo.convert moe-llava --checkpoint DIR --out DIR [--image-tower DIR_OR_ID]

The official layout (what its ``save_pretrained`` writes; ``tests/fixtures/moe_llava_official`` holds tiny real
examples made by running the official code):

- ``config.json``: ``model_type`` ``moe_llava_stablelm`` (StableLM-2's remote-code ``StableLMEpoch`` keys:
  ``rope_pct``, ``norm_eps``, ``use_qkv_bias``), ``moe_llava_phi`` (transformers' Phi keys) or ``moe_llava_qwen``
  (Qwen-1 remote-code keys), the LLaVA keys (``mm_image_tower``, ``mm_hidden_size``, ``mm_vision_select_layer``,
  ``mm_vision_select_feature``, ``image_projector_type``) and a nested ``"moe"`` dict: ``moe_enable``,
  ``moe_layers_idx`` (or ``moe_mode``: sparse / first_half / second_half / dense), ``num_experts`` (one count per
  MoE layer), ``top_k_experts``, ``capacity_factor``, ``eval_capacity_factor``, ``min_capacity``, ``use_residual``,
  ``router_aux_loss_coef``, ``ep_size``, ``train_modules``.
- weights (``model.safetensors``, shards with an index, or ``pytorch_model.bin``), under ``model.`` (StableLM, Phi)
  or ``transformer.`` (Qwen): the language model in its own layout, where each MoE layer's FFN is DeepSpeed's
  ``mlp.deepspeed_moe.gate.wg.weight`` ``[E, D]`` (router, fp32, no bias) and
  ``mlp.deepspeed_moe.experts.deepspeed_experts.{e}.<the family's FFN>``; the projector
  ``mm_projector.image_spatial_proj.*`` and usually the tower ``image_tower.image_tower.vision_model.*``.

The tower's config (and, as the official loader does, its weights) come from ``--image-tower`` or from the config's
``mm_image_tower`` name resolved OFFLINE (:func:`zoo.convert.hf_files.find_hf_folder`: a folder, a folder of that
name next to the checkpoint, or the Hugging Face cache). The official eval loader ignores the checkpoint's tower
tensors and reloads the tower from ``mm_image_tower``; so does this converter (a warning says when the checkpoint's
copy differs).

Routing as converted (the zoo differs from DeepSpeed 0.9.5 on purpose, see the README of the fixture):
- top-k over a softmax of all experts, k = ``top_k_experts``; top-2 gates renormalised to sum 1 (DeepSpeed's
  ``top2gating``; its top-1 does not renormalise); the 2nd expert is the 2nd-highest gate. DeepSpeed adds Gumbel
  noise before choosing the 2nd expert, in eval too, so official scores move between runs; the zoo is
  deterministic.
- capacity ``ceil(S * k * cf / E)`` with the official ``capacity_factor`` / ``eval_capacity_factor``, no rounding
  to a multiple. DeepSpeed counts all ``B * S`` positions of a batch (padding included) as one group and has a
  ``min_capacity`` floor; the zoo's causal layers give each sequence its own capacity, filled in position order,
  and padding takes none. With the released settings (4 experts, top-2, eval capacity factor 2.0) neither drops a
  token in eval, so the converted model's logits equal the official ones (``tests/convert/test_moe_llava_convert.py``).
- ``router_aux_loss_coef`` is the weight of the GShard / Switch balance loss (DeepSpeed's ``l_aux``).
- Qwen-1's ``use_dynamic_ntk`` / ``use_logn_attn`` act only past ``seq_length``; the zoo does not apply them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from zoo.config import ConfigError, from_dict
from zoo.convert.hf_files import HFCheckpointError, TensorPool, find_hf_folder, read_hf_folder, read_hf_weights, \
    read_json
from zoo.convert.hf_lm import CONFIG_MAPS, convert_state_dict
from zoo.convert.hf_vision import hf_vision_state_dict, split_hf_vision_tensors, vision_config_from_hf
from zoo.models.decoder import DecoderConfig, decoder_moe_layers
from zoo.models.towers import VisionTowerConfig
from zoo.moe.config import MoEConfig

PathLike = Union[str, Path]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Family:
    """What differs between the official language-model layouts."""

    lm_model_type: str  # the plain transformers / remote-code model_type of the language model (zoo.convert.hf_lm)
    root: str  # prefix of the LLaVA model inside the checkpoint
    layer: str  # one decoder layer, formatted with its index
    expert_ffn: tuple[str, ...]  # the FFN's linears: (gate, up, down) for gated MLPs, (fc1, fc2) for plain ones
    config_renames: dict[str, str] = field(default_factory=dict)  # official key -> the key zoo.convert.hf_lm reads


FAMILIES: dict[str, _Family] = {
    # StableLMEpoch (the remote code MoE-LLaVA vendors) names two keys differently from transformers' stablelm.
    "moe_llava_stablelm": _Family("stablelm", "model", "model.layers.{}", ("gate_proj", "up_proj", "down_proj"),
                                  {"rope_pct": "partial_rotary_factor", "norm_eps": "layer_norm_eps"}),
    "moe_llava_phi": _Family("phi", "model", "model.layers.{}", ("fc1", "fc2")),
    # Qwen-1's MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection.
    "moe_llava_qwen": _Family("qwen", "transformer", "transformer.h.{}", ("w2", "w1", "c_proj")),
}
_ROUTER = "mlp.deepspeed_moe.gate.wg.weight"
_EXPERT = "mlp.deepspeed_moe.experts.deepspeed_experts.{}"
_TOWER = "image_tower.image_tower."  # + vision_model.* (CLIP / SigLIP as transformers saves them)
_PROJECTOR = "mm_projector.image_spatial_proj."
_PROJECTORS = {"mlp2x_gelu": "mlp2x_gelu", "linear": "linear"}


@dataclass
class MoELLaVAParts:
    """A converted official checkpoint, before it becomes a zoo model.

    ``decoder``: the language model (:class:`DecoderConfig` with its MoE layers); ``tower``: the vision tower
    (:class:`VisionTowerConfig`); ``projector``: kind (``"mlp2x_gelu"`` / ``"linear"``) from the tower width
    ``tower.dim`` to ``decoder.dim``. ``lm`` / ``vision_tower`` / ``projector_state``: state dicts in the zoo names of
    :class:`zoo.models.decoder.DecoderLM`, :class:`zoo.models.towers.VisionTower` and
    :class:`zoo.models.connectors.Projector`. ``official``: the official config.json; ``notes``: what the
    conversion decided (for the model card).
    """

    decoder: DecoderConfig
    tower: VisionTowerConfig
    projector: str
    lm: dict[str, Tensor]
    vision_tower: dict[str, Tensor]
    projector_state: dict[str, Tensor]
    official: dict[str, Any]
    tower_folder: Path
    notes: list[str]


# ------------------------------------------------------------------------------------------------ config
def _family(official: dict[str, Any]) -> _Family:
    model_type = official.get("model_type")
    if model_type not in FAMILIES:
        raise HFCheckpointError(
            f"model_type {model_type!r} is not an MoE-LLaVA checkpoint; this converter reads "
            f"{sorted(FAMILIES)} (for a plain language model use `python -m zoo.convert hf-lm`)")
    return FAMILIES[model_type]


def moe_layer_indices(official: dict[str, Any]) -> tuple[int, ...]:
    """The MoE layers of an official config: ``moe.moe_layers_idx`` (what training writes), else ``moe.moe_mode``."""
    moe, depth = official["moe"], official["num_hidden_layers"]
    idx = moe.get("moe_layers_idx")
    if idx is None:
        mode = moe.get("moe_mode", "sparse")
        try:
            return decoder_moe_layers(depth, mode)
        except ValueError as err:
            raise HFCheckpointError(f"config.json moe.moe_mode: {err}") from err
    idx = tuple(int(i) for i in idx)
    bad = [i for i in idx if not 0 <= i < depth]
    if bad or len(set(idx)) != len(idx):
        raise HFCheckpointError(f"config.json moe.moe_layers_idx {list(idx)} must be distinct layer indices in "
                                f"[0, {depth}) (num_hidden_layers={depth})")
    return tuple(sorted(idx))


def moe_config_from_official(official: dict[str, Any]) -> Optional[MoEConfig]:
    """The zoo :class:`MoEConfig` of the official ``"moe"`` dict (None when ``moe_enable`` is false)."""
    moe = official.get("moe")
    if not isinstance(moe, dict):
        raise HFCheckpointError("config.json has no \"moe\" dict; an MoE-LLaVA stage-III checkpoint has one "
                                "(written by initialize_moe_modules)")
    if not moe.get("moe_enable", True):
        return None
    if moe.get("use_residual", False):
        raise HFCheckpointError("moe.use_residual=true (DeepSpeed's residual MoE: a dense MLP mixed in by a learned "
                                "coefficient) is not supported; none of the released checkpoints uses it")
    counts = moe.get("num_experts")
    counts = [counts] if isinstance(counts, int) else list(counts or [])
    if not counts or len(set(counts)) != 1:
        raise HFCheckpointError(f"moe.num_experts {counts!r}: the zoo needs the same expert count in every MoE layer")
    n_layers = len(moe_layer_indices(official))
    if len(counts) not in (1, n_layers):
        raise HFCheckpointError(f"moe.num_experts has {len(counts)} entries for {n_layers} MoE layers")
    k = int(moe.get("top_k_experts", 2))
    activation = "gelu_tanh" if official["model_type"] == "moe_llava_phi" else "swiglu"
    try:
        return MoEConfig(
            num_experts=int(counts[0]), top_k=k, router="topk", noise_std=0.0, renormalize=k == 2,
            batch_priority=False, capacity_factor=float(moe.get("capacity_factor", 1.0)),
            eval_capacity_factor=float(moe.get("eval_capacity_factor", 1.0)), capacity_multiple_of=1,
            group_size=1, activation=activation, expert_bias=official["model_type"] == "moe_llava_phi",
            importance_loss_weight=0.0, load_loss_weight=0.0, num_modalities=2,  # routers see text / image ids
            switch_loss_weight=float(moe.get("router_aux_loss_coef", 0.01)))
    except ValueError as err:
        raise HFCheckpointError(f"config.json \"moe\": {err}") from err


def decoder_config_from_official(official: dict[str, Any], lm_head_bias: bool = False) -> DecoderConfig:
    """The zoo :class:`DecoderConfig` (MoE layers included) of an official MoE-LLaVA config.json."""
    fam = _family(official)
    lm = {fam.config_renames.get(k, k): v for k, v in official.items() if k != "moe"}
    lm["model_type"] = fam.lm_model_type
    try:
        data = CONFIG_MAPS[fam.lm_model_type](lm)
    except KeyError as err:
        raise HFCheckpointError(f"{official['model_type']} config.json lacks {err.args[0]!r}") from err
    # The official Phi class builds its LM head without the bias Phi-2 has; follow the weights.
    data["lm_head_bias"] = lm_head_bias
    moe = moe_config_from_official(official)
    if moe is not None:
        data.update(moe=moe, moe_layers=moe_layer_indices(official), moe_placement=None)
    try:
        return from_dict(DecoderConfig, data, where=f"DecoderConfig from {official['model_type']} config.json")
    except ConfigError as err:
        raise HFCheckpointError(str(err)) from err


def tower_config_from_official(official: dict[str, Any], tower_hf_config: dict[str, Any]) -> VisionTowerConfig:
    """The zoo tower config: the tower folder's shape + the official feature rule. The official towers read
    ``hidden_states[mm_vision_select_layer]`` and, for ``mm_vision_select_feature="patch"``, slice ``[:, 1:]``:
    CLIP's class token, but on SigLIP (no class token) the first patch (the zoo's ``"drop_first"``), which is how
    those checkpoints were trained."""
    feature = official.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise HFCheckpointError(f"mm_vision_select_feature {feature!r} is not one of the official 'patch' / "
                                "'cls_patch'")
    layer = int(official.get("mm_vision_select_layer", -2))
    cfg = vision_config_from_hf(tower_hf_config, feature_layer=layer, select="cls_patch")
    if feature == "patch":
        cfg.select = "patch" if cfg.class_token else "drop_first"
    return cfg


def resolve_tower_folder(official: dict[str, Any], checkpoint: Path, image_tower: Optional[PathLike]) -> Path:
    """The tower's Hugging Face folder: ``image_tower`` if given, else ``mm_image_tower`` resolved offline."""
    if official.get("mm_video_tower"):
        raise HFCheckpointError("checkpoints with a video tower (mm_video_tower) are not supported")
    name = image_tower if image_tower is not None else official.get("mm_image_tower")
    if not name:
        raise HFCheckpointError("config.json names no mm_image_tower; pass --image-tower DIR_OR_ID")
    try:
        return find_hf_folder(name, search_dirs=(checkpoint, checkpoint.parent))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"the vision tower is needed (its config.json gives the tower's shape): {err}. "
                                "Pass --image-tower DIR (a CLIP / SigLIP folder with config.json and weights)") from err


# ------------------------------------------------------------------------------------------------ weights
def _expert_stacks(src: TensorPool, fam: _Family, layer: str, num_experts: int) -> dict[str, Tensor]:
    """Router and stacked experts of one DeepSpeed MoE layer in the zoo's names (``router.proj.weight``,
    ``experts.w1 [E, D, H or 2H]``, ``experts.w2 [E, H, D]``, ``experts.b1`` / ``b2`` for Phi)."""
    out = {"router.proj.weight": src.take(f"{layer}.{_ROUTER}").float()}  # stored fp32; keep it so
    w1, w2, b1, b2 = [], [], [], []
    for e in range(num_experts):
        p = f"{layer}.{_EXPERT.format(e)}"
        if len(fam.expert_ffn) == 3:  # gated: w1 = [gate | up]
            gate, up, down = fam.expert_ffn
            w1.append(torch.cat([src.take(f"{p}.{gate}.weight"), src.take(f"{p}.{up}.weight")]).t())
            w2.append(src.take(f"{p}.{down}.weight").t())
        else:
            fc1, fc2 = fam.expert_ffn
            w1.append(src.take(f"{p}.{fc1}.weight").t())
            b1.append(src.take(f"{p}.{fc1}.bias"))
            w2.append(src.take(f"{p}.{fc2}.weight").t())
            b2.append(src.take(f"{p}.{fc2}.bias"))
    extra = [n for n in src.tensors if n.startswith(f"{layer}.{_EXPERT.format(num_experts)}.")]
    if extra:
        raise HFCheckpointError(f"{layer} has more experts than moe.num_experts={num_experts} (e.g. {extra[0]})")
    out["experts.w1"], out["experts.w2"] = torch.stack(w1), torch.stack(w2)
    if b1:
        out["experts.b1"], out["experts.b2"] = torch.stack(b1), torch.stack(b2)
    return out


def _dense_ffn_names(fam: _Family, layer: str) -> list[str]:
    """The dense FFN tensor names of a layer in the language model's own layout (Phi's linears have biases)."""
    params = ("weight", "bias") if len(fam.expert_ffn) == 2 else ("weight",)
    return [f"{layer}.mlp.{lin}.{p}" for lin in fam.expert_ffn for p in params]


def convert_lm(official: dict[str, Any], tensors: dict[str, Tensor], cfg: DecoderConfig) -> dict[str, Tensor]:
    """The :class:`DecoderLM` state dict. Embeddings, attention, norms, dense FFNs and head go through
    :func:`zoo.convert.hf_lm.convert_state_dict` (the same layouts as plain StableLM / Phi / Qwen-1 checkpoints):
    it sees each MoE layer's expert 0 at the dense FFN's names, and that layer's FFN entries are then replaced by the
    router and all experts."""
    fam = _family(official)
    src = TensorPool(tensors)
    moe_at = set(cfg.moe_layer_indices)
    moe_parts: dict[int, dict[str, Tensor]] = {}
    for i in sorted(moe_at):
        moe_parts[i] = _expert_stacks(src, fam, fam.layer.format(i), cfg.moe.num_experts)
    dense_view = {n: t for n, t in tensors.items() if n not in src.taken}
    for i in moe_at:  # expert 0 stands in for the dense FFN only while hf_lm maps the rest
        layer = fam.layer.format(i)
        for name in _dense_ffn_names(fam, layer):
            dense_view[name] = tensors[name.replace(f"{layer}.mlp.", f"{layer}.{_EXPERT.format(0)}.")]
    dense_cfg = dataclasses.replace(cfg, moe=None, moe_layers=None, moe_placement=None, moe_every=None,
                                    moe_last=None, moe_mlp_dim=None)
    state = convert_state_dict({**official, "model_type": fam.lm_model_type}, dense_view, dense_cfg)
    for i, parts in moe_parts.items():
        for name in [n for n in state if n.startswith(f"blocks.{i}.mlp.")]:
            del state[name]
        state.update({f"blocks.{i}.mlp.{n}": t for n, t in parts.items()})
    return state


def convert_projector(official: dict[str, Any], tensors: dict[str, Tensor], root: str) -> tuple[str, dict]:
    kind = official.get("image_projector_type", "linear")
    if kind not in _PROJECTORS:
        raise HFCheckpointError(f"image_projector_type {kind!r} is not supported; supported: {sorted(_PROJECTORS)}")
    prefix = f"{root}.{_PROJECTOR}"
    found = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
    if kind == "linear":  # the official linear projector is a bare nn.Linear; the zoo's is Sequential's entry 0
        found = {f"0.{n}": t for n, t in found.items()}
    expected = {"0.weight", "0.bias"} | ({"2.weight", "2.bias"} if kind == "mlp2x_gelu" else set())
    if set(found) != expected:
        raise HFCheckpointError(f"projector {kind!r} needs {sorted(prefix + n for n in expected)}; the checkpoint "
                                f"has {sorted(prefix + n for n in found)}")
    return _PROJECTORS[kind], found


def read_moe_llava(checkpoint: PathLike, image_tower: Optional[PathLike] = None) -> MoELLaVAParts:
    """Read an official MoE-LLaVA checkpoint folder (and its tower folder) into :class:`MoELLaVAParts`."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} has no config.json; expected an MoE-LLaVA checkpoint folder")
    official = read_json(checkpoint / "config.json")
    fam = _family(official)  # refuse another model_type before reading any weights
    tower_folder = resolve_tower_folder(official, checkpoint, image_tower)
    tower_hf = read_json(tower_folder / "config.json") if (tower_folder / "config.json").is_file() else None
    if not isinstance(tower_hf, dict):
        raise FileNotFoundError(f"tower folder {tower_folder} has no config.json; expected a Hugging Face CLIP / "
                                "SigLIP folder")
    tower_cfg = tower_config_from_official(official, tower_hf)
    _, tensors = read_hf_folder(checkpoint)
    root = fam.root
    notes = [f"converted from the official {official['model_type']} checkpoint {checkpoint.name}",
             f"vision tower from {tower_folder}"]

    # the tower: the folder's weights (what the official loader runs); the checkpoint's copy is checked against it
    tower_tensors = read_hf_weights(tower_folder)
    prefix, _ = split_hf_vision_tensors(tower_tensors)
    tower_state, _ = hf_vision_state_dict(tower_tensors, tower_cfg, prefix)
    ckpt_tower = {n: t for n, t in tensors.items() if n.startswith(f"{root}.{_TOWER}")}
    if ckpt_tower:
        own, _ = hf_vision_state_dict(ckpt_tower, tower_cfg, f"{root}.{_TOWER}vision_model.")
        diff = max(float((own[n].float() - tower_state[n].float()).abs().max()) for n in own)
        if diff > 0:
            log.warning("the checkpoint's own tower weights differ from %s (max abs diff %.3g); using the folder's, "
                        "as the official loader does", tower_folder, diff)
            notes.append(f"checkpoint tower weights differ from the folder's by up to {diff:.3g}; folder's used")
    proj_kind, proj_state = convert_projector(official, tensors, root)
    if int(official.get("mm_hidden_size", tower_cfg.dim)) != tower_cfg.dim:
        raise HFCheckpointError(f"config.json mm_hidden_size={official['mm_hidden_size']} but the tower folder "
                                f"{tower_folder} has width {tower_cfg.dim}: wrong --image-tower?")
    lm_tensors = {n: t for n, t in tensors.items()
                  if not n.startswith((f"{root}.{_TOWER}", f"{root}.{_PROJECTOR}"))}
    decoder = decoder_config_from_official(official, lm_head_bias="lm_head.bias" in tensors)
    lm_state = convert_lm(official, lm_tensors, decoder)
    return MoELLaVAParts(decoder=decoder, tower=tower_cfg, projector=proj_kind, lm=lm_state,
                         vision_tower=tower_state, projector_state=proj_state, official=official,
                         tower_folder=tower_folder, notes=notes)


# ------------------------------------------------------------------------------------------------ model
def build_moe_llava(parts: MoELLaVAParts, dtype: torch.dtype = torch.float32):
    """The zoo :class:`zoo.models.moe_llava.MoELLaVA` holding ``parts`` (in ``dtype``, eval mode). Every parameter is
    filled with a tensor of its shape; anything missing or extra is an error naming it. The model is built on the
    meta device and the tensors become its parameters (:mod:`zoo.convert.empty_init`): no randomly initialised copy
    is made."""
    from zoo.convert.empty_init import init_empty, load_empty
    from zoo.models.moe_llava import MoELLaVA, MoELLaVAConfig

    max_len = parts.official.get("tokenizer_model_max_length")
    config = MoELLaVAConfig(vision=parts.tower, projector=parts.projector, decoder=parts.decoder,
                            tokenizer_model_max_length=int(max_len) if max_len else None)
    model = init_empty(lambda: MoELLaVA(config))
    state = {**{f"decoder.{n}": t for n, t in parts.lm.items()},
             **{f"vision_tower.{n}": t for n, t in parts.vision_tower.items()},
             **{f"projector.{n}": t for n, t in parts.projector_state.items()}}
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise HFCheckpointError(f"converted MoE-LLaVA state does not fit the zoo model: missing {missing[:4]}, "
                                f"unexpected {extra[:4]} (converter / model version mismatch)")
    for name, value in state.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise HFCheckpointError(f"config/weights mismatch: zoo {name} expects {tuple(expected[name].shape)} from "
                                    f"config.json, the checkpoint gives {tuple(value.shape)}")
    del expected
    return load_empty(model, {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()})


def load_moe_llava(checkpoint: PathLike, image_tower: Optional[PathLike] = None):
    """An official MoE-LLaVA checkpoint folder as a zoo ``MoELLaVA`` (float32, eval mode)."""
    return build_moe_llava(read_moe_llava(checkpoint, image_tower))


def convert_moe_llava(checkpoint: PathLike, out: PathLike, image_tower: Optional[PathLike] = None,
                      dtype: Optional[torch.dtype] = None):
    """Convert ``checkpoint`` (official MoE-LLaVA folder) and write a zoo folder to ``out`` that
    ``zoo.create_model("local-dir:OUT")`` loads. ``image_tower``: the tower's folder or hub id (default: the
    config's ``mm_image_tower``, resolved offline). ``dtype``: stored precision (default float32)."""
    from zoo.hub import save_pretrained

    parts = read_moe_llava(checkpoint, image_tower)
    model = build_moe_llava(parts, dtype=dtype or torch.float32)
    save_pretrained(model, out, tag=f"converted from {Path(checkpoint).name}")
    return model
