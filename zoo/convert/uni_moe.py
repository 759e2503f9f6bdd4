"""Official Uni-MoE v1 checkpoints (HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs, ``Uni_MoE_speech``) -> zoo
``uni_moe`` folders.

    python -m zoo.convert uni-moe --checkpoint DIR --out DIR [--vision-tower DIR] [--audio-tower DIR]
    python -m zoo.convert uni-moe --checkpoint FINETUNE_DIR --base BASE_DIR --out DIR [...]   # -e2 LoRA fine-tunes

LoRA fine-tunes (the v1 ``-e2`` releases: ``adapter_config.json`` + ``adapter_model.bin`` (PEFT LoRA),
``non_lora_trainables.bin``, ``mlp_gates.bin``, ``mm_audio_aligner.bin``, no LM weights) are read by
:func:`zoo.convert.uni_moe_lora.read_lora_finetune` on top of ``--base`` (the full checkpoint they were trained from):
non-LoRA tensors replace base ones, each LoRA delta ``(lora_alpha / r) B A`` is MERGED into its dense weight, then the
fine-tune's aligner and routers replace the base's, in the official loader's order; the result converts like a full
folder (plain ``StackedExperts``, no LoRA modules in the zoo model).

The official folder is read by :func:`zoo.convert.uni_moe_layout.read_uni_moe_layout` (it knows the official names;
see its docstring and ``tests/fixtures/uni_moe_official/README.md``); this module maps the groups onto
:class:`zoo.models.uni_moe.UniMoE`:

- LM (LLaMA with an MoE FFN in the layers the config names): through :func:`zoo.convert.hf_lm.convert_state_dict`
  as a ``llama`` checkpoint whose MoE layers are stored like transformers' MoE layouts (``mlp.gate.weight`` ->
  ``mlp.router.proj.weight``; experts ``w1 = [gate | up]^T`` ``[E, D, 2H]``, ``w2 = down^T`` ``[E, H, D]``).
  Routing as the official (Mixtral): top-k of the raw router logits, softmax over the k chosen (= renormalised
  softmax top-k), dropless, no noise, no auxiliary loss (the v1 speech forward returns none).
- image tower: the CLIP folder (``--vision-tower``, else the config's ``mm_vision_tower`` resolved offline next to
  the checkpoint or in the Hugging Face cache), ``hidden_states[mm_vision_select_layer]`` without the class token
  (``mm_vision_select_feature`` ``patch``); projector ``mm_projector_type`` (``linear`` / ``mlp2x_gelu``).
- audio: the Whisper ENCODER of the Whisper folder (``--audio-tower`` / ``mm_audio_tower``; its decoder is not run by
  the official code), the aligner's Whisper decoder (``model.mm_audio_aligner.decoder.audio_decoder.*``) as the
  Q-Former with ``model.query_tokens`` as its input embeddings, and the aligner's projector
  (``audio_projector_type`` ``linear`` / ``mlp2x_gelu``).

The tower tensors saved inside the checkpoint are not used (the official loader drops them and reloads the towers
from their folders; so does this converter). Inputs of the converted model: see :class:`zoo.models.uni_moe.UniMoE`
(log-mel windows ``[B, C, n_mels, frames]`` + ``audio_chunks`` = the official ``input_features`` / ``features_mask >
0``; ``images[b]`` belongs to sample b, where the official hands images out by its ``image_mask``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from zoo.config import ConfigError, from_dict
from zoo.convert.hf_files import HFCheckpointError, TensorPool, find_hf_folder, read_json
from zoo.convert.hf_lm import CONFIG_MAPS, _moe, convert_state_dict
from zoo.convert.hf_vision import hf_vision_state_dict, split_hf_vision_tensors
from zoo.convert.hf_whisper import encoder_state_dict, qformer_state_dict, whisper_configs
from zoo.convert.moe_llava import tower_config_from_official
from zoo.convert.uni_moe_8e import is_8e_folder, read_8e_finetune
from zoo.convert.uni_moe_layout import UniMoELayout, read_uni_moe_layout
from zoo.convert.uni_moe_lora import is_lora_folder, read_lora_finetune
from zoo.models.decoder import DecoderConfig
from zoo.models.multimodal import NUM_MODALITIES

PathLike = Union[str, Path]
_PROJECTORS = ("linear", "mlp2x_gelu")


@dataclasses.dataclass
class UniMoEParts:
    """A converted official checkpoint before it becomes a zoo model: ``config`` (:class:`UniMoEConfig`), ``state``
    (its full state dict in the zoo's names), the tower folders used and ``notes`` (for the model card)."""

    config: Any
    state: dict[str, Tensor]
    vision_folder: Optional[Path]
    audio_folder: Optional[Path]
    notes: list[str]


def audio_chunks_from_official(features_mask: Tensor) -> Tensor:
    """The official ``features_mask`` ``[B, C]`` (per window: the id of the clip it belongs to, windows of one clip
    consecutive; a value < 1 ends the sample's list) -> the zoo's ``audio_chunks`` ``[B, C]`` bool (True = a window
    of the sample's one clip). The zoo model takes one clip per sample: a sample whose windows carry more than one
    id (several ``<audio>`` placeholders) is refused."""
    if not isinstance(features_mask, Tensor) or features_mask.dim() != 2:
        raise ValueError(f"features_mask must be [B, C] window ids, got "
                         f"{tuple(features_mask.shape) if isinstance(features_mask, Tensor) else type(features_mask)}")
    valid = (features_mask >= 1).long().cumprod(dim=1).bool()  # the windows before the first value < 1
    for b in range(features_mask.shape[0]):
        ids = features_mask[b][valid[b]].unique()
        if len(ids) > 1:
            raise ValueError(f"sample {b} has windows of {len(ids)} clips (features_mask ids {ids.tolist()}); the zoo "
                             "Uni-MoE takes one audio clip per sample: split the sample or keep one clip")
    return valid


# ------------------------------------------------------------------------------------------------ towers
def resolve_tower(official: dict[str, Any], key: str, checkpoint: Path, given: Optional[PathLike],
                  flag: str, extra_dirs: tuple[Path, ...] = ()) -> Optional[Path]:
    """The tower folder: ``given`` if passed, else the config's ``key`` resolved offline (the folder, a folder of
    that name next to the checkpoint, the Hugging Face cache); None when the config names no such tower."""
    name = given if given is not None else official.get(key)
    if not name:
        return None
    try:
        folder = find_hf_folder(name, search_dirs=(checkpoint, checkpoint.parent, *extra_dirs))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"the {key} tower is needed (the official model reloads it from its own folder): "
                                f"{err}. Pass {flag} DIR (the Hugging Face folder with config.json and weights)"
                                ) from err
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} (for {key}) has no config.json; pass {flag} DIR, a Hugging Face folder "
                                "with config.json and weights")
    return folder


def vision_state(official: dict[str, Any], layout: Any, vision_folder: Optional[Path], state: dict[str, Tensor],
                 notes: list[str]) -> tuple[Any, str]:
    """The image side of an official Uni-MoE layout (every variant has the same one): the CLIP tower's and the
    ``mm_projector``'s tensors into ``state`` (``vision_tower.*``, ``projector.*``), a line into ``notes``; returns
    ``(vision tower config or None, projector kind)``. A projector without a tower, or a tower without a projector,
    is a clear error."""
    s = layout.settings
    if layout.vision_tower is None:
        if layout.projector:
            raise HFCheckpointError("the checkpoint has an image projector but config.json names no mm_vision_tower; "
                                    "pass --vision-tower DIR")
        return None, "mlp2x_gelu"
    hf_cfg, tensors = layout.vision_tower
    vision_cfg = tower_config_from_official(official, hf_cfg)
    prefix, _ = split_hf_vision_tensors(tensors)
    tower_state, _ = hf_vision_state_dict(tensors, vision_cfg, prefix)
    if s["mm_hidden_size"] is not None and int(s["mm_hidden_size"]) != vision_cfg.dim:
        raise HFCheckpointError(f"config.json mm_hidden_size={s['mm_hidden_size']} but the vision tower "
                                f"{vision_folder} has width {vision_cfg.dim}: wrong --vision-tower?")
    if not layout.projector:
        raise HFCheckpointError("the checkpoint names a vision tower but has no model.mm_projector.* in its weights, "
                                "mm_projector.bin or non_lora_trainables.bin: copy the release's mm_projector.bin "
                                "into the folder")
    projector_kind = s["mm_projector_type"]
    state.update({f"vision_tower.{k}": v for k, v in tower_state.items()})
    state.update({f"projector.{k}": v for k, v in _projector(projector_kind, layout.projector, "mm_projector").items()})
    notes.append(f"vision tower from {vision_folder}")
    return vision_cfg, projector_kind


def _projector(kind: str, tensors: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    """A :class:`zoo.models.connectors.Projector` state dict (``linear`` is a bare nn.Linear officially)."""
    if kind not in _PROJECTORS:
        raise HFCheckpointError(f"{what} type {kind!r} is not supported; supported: {list(_PROJECTORS)} (the zoo "
                                "Projector has no other official kind)")
    if kind == "linear" and set(tensors) == {"weight", "bias"}:
        tensors = {f"0.{k}": v for k, v in tensors.items()}
    expected = {"0.weight", "0.bias"} | ({"2.weight", "2.bias"} if kind == "mlp2x_gelu" else set())
    if set(tensors) != expected:
        raise HFCheckpointError(f"{what} {kind!r} needs tensors {sorted(expected)}, the checkpoint has "
                                f"{sorted(tensors)}")
    return dict(tensors)


# ------------------------------------------------------------------------------------------------ LM
def decoder_config_from_layout(layout: UniMoELayout) -> DecoderConfig:
    """The zoo :class:`DecoderConfig`: the LLaMA shape of config.json and Mixtral-style MoE FFNs in the layers the
    config makes MoE (every layer in v1), with modality ids 0..3 for the routers."""
    s, cfg = layout.settings, layout.config
    if s["hidden_act"] not in ("silu", "swish"):
        raise HFCheckpointError(f"Uni-MoE hidden_act {s['hidden_act']!r}: only silu (SwiGLU) LLaMA is supported")
    data = CONFIG_MAPS["llama"]({**cfg, "model_type": "llama"})
    if s["moe"]:
        hf = {**cfg, "router_aux_loss_coef": 0.0}  # the v1 speech forward adds no balance loss
        data.update(moe=_moe(hf, int(s["num_experts"]), renormalize=True, num_modalities=NUM_MODALITIES),
                    moe_layers=tuple(s["moe_layers"]), moe_placement=None)
    try:
        return from_dict(DecoderConfig, data, where="DecoderConfig from the Uni-MoE config.json")
    except ConfigError as err:
        raise HFCheckpointError(str(err)) from err


def lm_state_dict(layout: UniMoELayout, cfg: DecoderConfig) -> dict[str, Tensor]:
    """The :class:`DecoderLM` state dict, the layout's groups renamed back to a llama checkpoint's names (routers at
    ``mlp.gate.weight``, experts at ``mlp.experts.{e}.{gate,up,down}_proj.weight``) for
    :func:`zoo.convert.hf_lm.convert_state_dict`."""
    tensors = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in layout.lm.items()}
    for i, router in layout.routers.items():
        tensors[f"model.layers.{i}.mlp.gate.weight"] = router
        for e, expert in enumerate(layout.experts[i]):
            tensors.update({f"model.layers.{i}.mlp.experts.{e}.{n}": t for n, t in expert.items()})
    for i, mlp in layout.dense_mlps.items():
        tensors.update({f"model.layers.{i}.mlp.{n}": t for n, t in mlp.items()})
    return convert_state_dict({**layout.config, "model_type": "llama"}, tensors, cfg)


# ------------------------------------------------------------------------------------------------ read
def read_uni_moe(checkpoint: PathLike, vision_tower: Optional[PathLike] = None,
                 audio_tower: Optional[PathLike] = None, base: Optional[PathLike] = None,
                 mlp_dir: Optional[PathLike] = None, expert_bases: Any = None) -> UniMoEParts:
    """Read an official Uni-MoE v1 checkpoint folder (and its tower folders) into :class:`UniMoEParts`. A LoRA
    fine-tune folder (``-e2``: ``adapter_config.json`` / ``non_lora_trainables.bin``) needs ``base``, the full
    checkpoint it was trained from; its LoRA deltas are merged (:mod:`zoo.convert.uni_moe_lora`). An 8-expert
    fine-tune (``{e}_mlp_experts.bin`` files) also needs ``mlp_dir`` (the experts' base FFN files) and optionally
    ``expert_bases`` (which file each expert uses; default the official table): :mod:`zoo.convert.uni_moe_8e`."""
    from zoo.models.uni_moe import UniMoEConfig

    checkpoint = Path(checkpoint)
    from zoo.convert.uni_moe_audio import is_audio_variant, read_uni_moe_audio
    if is_audio_variant(checkpoint):  # BEATs + BLIP-2 aligner: its own layout (zoo/convert/uni_moe_audio.py)
        return read_uni_moe_audio(checkpoint, vision_tower, audio_tower, base)
    merged = None
    if is_8e_folder(checkpoint):
        merged = read_8e_finetune(checkpoint, base, mlp_dir, expert_bases)
        official = merged[0]
    elif mlp_dir is not None or expert_bases is not None:
        raise HFCheckpointError(f"--mlp-dir / --expert-bases are for 8-expert fine-tunes, but {checkpoint} has no "
                                "{e}_mlp_experts.bin files")
    elif is_lora_folder(checkpoint):
        merged = read_lora_finetune(checkpoint, base)
        official = merged[0]
    elif base is not None:
        raise HFCheckpointError(f"--base was given but {checkpoint} is not a LoRA fine-tune (no adapter_config.json "
                                "/ non_lora_trainables.bin); convert a full checkpoint without --base")
    elif not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} has no config.json; expected an official Uni-MoE checkpoint folder")
    else:
        official = read_json(checkpoint / "config.json")
    if not isinstance(official, dict) or official.get("model_type") != "llava" or \
            "mm_audio_tower" not in official and "num_experts" not in official:
        model_type = official.get("model_type") if isinstance(official, dict) else None
        raise HFCheckpointError(f"{checkpoint} is not an official Uni-MoE checkpoint: model_type {model_type!r} "
                                "(expected 'llava' with mm_audio_tower / num_experts); for MoE-LLaVA use "
                                "`python -m zoo.convert moe-llava`, for a plain LM `hf-lm`")
    if official.get("mm_video_tower"):
        raise HFCheckpointError("checkpoints with a separate video tower (mm_video_tower) are not supported")
    extra_dirs = (Path(base), Path(base).parent) if merged is not None else ()
    vision_folder = resolve_tower(official, "mm_vision_tower", checkpoint, vision_tower, "--vision-tower", extra_dirs)
    audio_folder = resolve_tower(official, "mm_audio_tower", checkpoint, audio_tower, "--audio-tower", extra_dirs)
    layout = read_uni_moe_layout(checkpoint, vision_tower_dir=vision_folder, audio_tower_dir=audio_folder,
                                 config=merged[0] if merged else None, tensors=merged[1] if merged else None)
    s = layout.settings
    notes = [f"converted from the official Uni-MoE checkpoint {checkpoint.name}"] + (merged[2] if merged else [])
    decoder = decoder_config_from_layout(layout)
    state = {f"decoder.{k}": v for k, v in lm_state_dict(layout, decoder).items()}

    vision_cfg, projector_kind = vision_state(official, layout, vision_folder, state, notes)

    enc_cfg = qformer_cfg = None
    audio_projector = "linear"
    if layout.audio_tower is not None:
        if int(s["mm_audio_select_layer"] or 0) != 0:
            raise HFCheckpointError(f"mm_audio_select_layer={s['mm_audio_select_layer']}: the official audio tower "
                                    "only works with 0 (the encoder's last_hidden_state)")
        hf_cfg, tensors = layout.audio_tower
        aligner = layout.audio_aligner
        queries = aligner["query_tokens"]
        enc_cfg, qformer_cfg = whisper_configs(hf_cfg, num_queries=int(queries.shape[1]))
        pos = aligner.get("decoder.embed_positions.weight")
        if pos is not None:  # the aligner's own decoder table decides the Q-Former's positions
            qformer_cfg = dataclasses.replace(qformer_cfg, max_positions=int(pos.shape[0]))
        if queries.shape[-1] != qformer_cfg.dim:
            raise HFCheckpointError(f"model.query_tokens width {queries.shape[-1]} differs from the Whisper folder's "
                                    f"d_model {qformer_cfg.dim}: wrong --audio-tower?")
        root = "model." if any(k.startswith("model.encoder.") for k in tensors) else ""
        pool = TensorPool(dict(tensors))
        state.update({f"audio_encoder.{k}": v for k, v in encoder_state_dict(pool, root + "encoder.",
                                                                              enc_cfg).items()})
        left = [n for n in pool.left() if not n.startswith((root + "decoder.", "proj_out."))]
        if left:
            raise HFCheckpointError(f"{audio_folder}: tensor(s) {left[:5]} are not part of a Whisper model "
                                    "(is --audio-tower a Whisper folder with as many layers as its config?)")
        apool = TensorPool({k: v for k, v in aligner.items() if k != "query_tokens"})
        q_state = qformer_state_dict(apool, "decoder.", qformer_cfg)
        if "decoder.embed_tokens.weight" in apool:  # saved, never used: the queries are the decoder's inputs
            apool.take("decoder.embed_tokens.weight")
        audio_projector = s["audio_projector_type"]
        proj = {k[len("projector."):]: apool.take(k) for k in list(apool.tensors) if k.startswith("projector.")}
        left = apool.left()
        if left:
            raise HFCheckpointError(f"audio aligner tensor(s) {left[:5]} do not fit a Whisper decoder of the audio "
                                    f"tower's shape ({qformer_cfg.depth} layers); wrong --audio-tower?")
        state.update({f"audio_connector.qformer.{k}": v for k, v in q_state.items()})
        state.update({f"audio_connector.projector.{k}": v for k, v in
                      _projector(audio_projector, proj, "audio_projector").items()})
        state["audio_connector.query_tokens"] = queries
        notes.append(f"audio tower (Whisper encoder) from {audio_folder}")

    max_len = official.get("tokenizer_model_max_length")
    try:
        config = UniMoEConfig(vision=vision_cfg, projector=projector_kind, audio_encoder=enc_cfg,
                              audio_qformer=qformer_cfg, audio_projector=audio_projector, decoder=decoder,
                              tokenizer_model_max_length=int(max_len) if max_len else None)
    except ValueError as err:
        raise HFCheckpointError(f"the official config does not give a valid zoo Uni-MoE: {err}") from err
    return UniMoEParts(config=config, state=state, vision_folder=vision_folder, audio_folder=audio_folder,
                       notes=notes)


# ------------------------------------------------------------------------------------------------ model
def build_uni_moe(parts: UniMoEParts, dtype: torch.dtype = torch.float32):
    """The zoo :class:`zoo.models.uni_moe.UniMoE` holding ``parts`` (floating-point tensors in ``dtype``, eval mode).
    Every parameter and buffer is filled with a tensor of its shape; anything missing or extra is an error naming it.
    The model is built on the meta device and the tensors become its parameters (:mod:`zoo.convert.empty_init`): no
    randomly initialised copy is made."""
    from zoo.convert.empty_init import init_empty, load_empty
    from zoo.models.uni_moe import UniMoE

    model = init_empty(lambda: UniMoE(parts.config))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(parts.state))
    extra = sorted(set(parts.state) - set(expected))
    if missing or extra:
        raise HFCheckpointError(f"converted Uni-MoE state does not fit the zoo model: missing {missing[:4]}, "
                                f"unexpected {extra[:4]} (converter / model version mismatch)")
    for name, value in parts.state.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise HFCheckpointError(f"config/weights mismatch: zoo {name} expects {tuple(expected[name].shape)} from "
                                    f"config.json, the checkpoint gives {tuple(value.shape)}")
    state = {n: t.to(dtype if expected[n].is_floating_point() else expected[n].dtype) for n, t in parts.state.items()}
    del expected
    return load_empty(model, state)


def load_uni_moe(checkpoint: PathLike, vision_tower: Optional[PathLike] = None,
                 audio_tower: Optional[PathLike] = None, base: Optional[PathLike] = None,
                 mlp_dir: Optional[PathLike] = None, expert_bases: Any = None):
    """An official Uni-MoE v1 checkpoint folder (a LoRA fine-tune with ``base``; an 8-expert fine-tune with ``base``
    and ``mlp_dir``) as a zoo ``UniMoE`` (float32, eval mode)."""
    return build_uni_moe(read_uni_moe(checkpoint, vision_tower, audio_tower, base, mlp_dir, expert_bases))


def convert_uni_moe(checkpoint: PathLike, out: PathLike, vision_tower: Optional[PathLike] = None,
                    audio_tower: Optional[PathLike] = None, dtype: Optional[torch.dtype] = None,
                    base: Optional[PathLike] = None, mlp_dir: Optional[PathLike] = None,
                    expert_bases: Any = None):
    """Convert ``checkpoint`` (official Uni-MoE v1 folder) and write a zoo folder to ``out`` that
    ``zoo.create_model("local-dir:OUT")`` loads. ``vision_tower`` / ``audio_tower``: the CLIP / Whisper folders
    (default: the config's ``mm_vision_tower`` / ``mm_audio_tower`` resolved offline). ``dtype``: stored precision
    (default float32). ``base``: for a LoRA fine-tune folder (``-e2``), the full checkpoint it was trained from.
    ``mlp_dir`` / ``expert_bases``: for an 8-expert fine-tune (:mod:`zoo.convert.uni_moe_8e`)."""
    from zoo.hub import save_pretrained

    model = build_uni_moe(read_uni_moe(checkpoint, vision_tower, audio_tower, base, mlp_dir, expert_bases))
    save_pretrained(model, out, dtype=dtype, tag=f"converted from {Path(checkpoint).name}")
    return model
