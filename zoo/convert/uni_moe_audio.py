"""Official Uni-MoE AUDIO-variant checkpoints (HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs,
``Uni_MoE/Uni_MoE_audio``: BEATs encoder + BLIP-2 Q-Former aligner) -> zoo ``uni_moe`` folders.

    python -m zoo.convert uni-moe --checkpoint DIR --out DIR --audio-tower BEATs_iter3_plus_AS2M.pt [--vision-tower DIR]

:func:`zoo.convert.uni_moe.read_uni_moe` sends a folder here when :func:`is_audio_variant` says so (an
``mm_audio_aligner.qformer.*`` tensor name in the weight index or ``mm_audio_aligner.bin``; without aligner names,
a config ``mm_audio_tower`` naming a ``.pt`` / BEATs file). The folder the official training script writes
(``safe_save_all_for_hf_trainer``): ``config.json``, the weights (``pytorch_model*.bin`` + index), and the adapter files
``mm_audio_aligner.bin`` (``model.mm_audio_aligner.{qformer.qformer.*, projector.*, query_tokens}``),
``non_lora_trainables.bin`` (here: ``model.mm_projector.*``, despite its name), ``mlp_gates.bin`` (routers); the
released base folder also has ``mm_projector.bin``. Adapter tensors fill in what the weights lack and must agree with
them otherwise (:func:`zoo.convert.uni_moe_layout.read_official_tensors`; ``non_lora_trainables.bin`` and
``mlp_gates.bin`` are checked here). See ``tests/fixtures/uni_moe_audio_official/README.md``.

What differs from the speech (v1) layout, and how it maps onto :class:`zoo.models.uni_moe.UniMoE`:

- LM: MoE only in the EVEN layers (the official ``LlamaDecoderLayer`` builds an MoE FFN when ``config.moe`` is set and
  ``layer % 2 == 0``; odd layers keep a dense SwiGLU ``model.layers.{i}.mlp.{gate,up,down}_proj``) -> zoo
  ``moe_layers = (0, 2, 4, ...)``. Routing as v1 (top-k of raw logits, softmax over the k, dropless, no aux loss).
- audio tower: an official BEATs ``.pt`` (``{"cfg", "model"}``), from ``--audio-tower FILE`` (or a folder holding one
  ``.pt``); without the flag, a file with the config's ``mm_audio_tower`` base name next to the checkpoint or in its
  parent. The config's path itself is never opened. -> ``audio_beats`` via :mod:`zoo.convert.beats`.
- aligner: transformers' ``Blip2QFormerModel`` (``qformer.qformer.*``) fed ``query_tokens`` ``[1, Q, d]`` as
  ``query_embeds``, its ``last_hidden_state`` through ``projector`` (``audio_projector_type``, official default
  ``linear``) -> ``audio_blip2`` (:class:`zoo.models.qformer.Blip2AudioConnector`). The official code builds this
  Q-Former from ``Blip2Config()`` DEFAULTS whatever the model config says, so the head count (12), cross-attention
  every 2nd block and LayerNorm eps 1e-12 are fixed; width, depth and MLP width are read off the tensors.
- audio inputs: the official pipeline cuts each clip into 480000-sample (30 s) windows, pads the last by repeating
  its last sample, encodes every window on its own (``query_tokens_size`` tokens each) and gives the Q-Former an
  all-ones mask (its queries read BEATs outputs at padded positions too). The converted model reproduces that:
  ``audio_beats_window=480000``, ``audio_beats_mask_padding=False`` (the zoo defaults, whole clips and masked padding,
  are for models trained in the zoo). It takes waveforms ``[B, samples]`` at 16 kHz + ``audio_lengths`` and computes
  the Kaldi fbank itself (the official feeds precomputed fbank; same numbers).
- image: CLIP + ``mm_projector`` as v1; video: the vision tower, mean over frames, as v1.

LoRA fine-tunes (``-e2``: ``adapter_config.json`` present) go through
:func:`zoo.convert.uni_moe_lora.read_lora_finetune` with ``--base`` (NOT tested on an audio-variant folder: no official
e2 fixture; that merge refuses a ``--base`` holding ``non_lora_trainables.bin``, which an official full save writes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from zoo.convert.hf_files import HFCheckpointError, PathLike, TensorPool, read_json, read_weight_file
from zoo.convert.uni_moe_layout import read_official_tensors, read_uni_moe_layout

ALIGNER = "model.mm_audio_aligner."
QFORMER = ALIGNER + "qformer.qformer."
WINDOW_SAMPLES = 480000  # the official data pipeline's window: 30 s at 16 kHz
# the official aligner's Blip2QFormerConfig defaults (not stored anywhere in a checkpoint)
QFORMER_HEADS, QFORMER_CROSS_EVERY, QFORMER_EPS = 12, 2, 1e-12
_CHECKED_ADAPTERS = ("non_lora_trainables.bin", "mlp_gates.bin")


def _tensor_names(folder: Path) -> list[str]:
    names: list[str] = []
    for index in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        if (folder / index).is_file():
            data = read_json(folder / index)
            names += list(data.get("weight_map", {})) if isinstance(data, dict) else []
    if (folder / "mm_audio_aligner.bin").is_file():
        names += list(read_weight_file(folder / "mm_audio_aligner.bin"))
    return names


def is_audio_variant(folder: PathLike) -> bool:
    """True for an official Uni-MoE audio-variant folder (BEATs + BLIP-2 aligner)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return False
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict) or cfg.get("model_type") != "llava" or not cfg.get("mm_audio_tower"):
        return False
    names = _tensor_names(folder)
    if any(n.startswith(ALIGNER + "qformer.") for n in names):
        return True
    if any(n.startswith(ALIGNER + "decoder.") for n in names):  # the speech variant's Whisper-decoder aligner
        return False
    tower = str(cfg["mm_audio_tower"])  # no aligner names seen: the tower is a BEATs .pt, not a Whisper folder
    return tower.endswith(".pt") or "beats" in tower.lower()


# ------------------------------------------------------------------------------------------------ BEATs tower
def resolve_beats(official: dict[str, Any], checkpoint: Path, given: Optional[PathLike],
                  extra_dirs: tuple[Path, ...] = ()) -> Path:
    """The BEATs ``.pt``: ``given`` (a file, or a folder with exactly one ``.pt``), else the config's
    ``mm_audio_tower`` BASE NAME looked up next to the checkpoint and in its parent."""
    hint = ("pass --audio-tower FILE, the official BEATs checkpoint the model was trained with (the release uses "
            "BEATs_iter3_plus_AS2M.pt)")
    if given is not None:
        path = Path(given)
        if path.is_dir():
            found = sorted(path.glob("*.pt"))
            if len(found) != 1:
                raise FileNotFoundError(f"--audio-tower {path} is a folder with {len(found)} .pt files; the audio "
                                        f"variant needs one BEATs .pt: {hint}")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"--audio-tower {path} does not exist; {hint}")
        return path
    name = Path(str(official.get("mm_audio_tower") or "")).name
    looked = [str(d / name) for d in (checkpoint, checkpoint.parent, *extra_dirs)] if name else []
    for cand in looked:
        if Path(cand).is_file():
            return Path(cand)
    raise FileNotFoundError(f"the audio tower (config mm_audio_tower {official.get('mm_audio_tower')!r}) is needed "
                            f"and the config's path is not followed; looked in {looked}: {hint}")


def read_beats_file(path: Path) -> tuple[Any, dict[str, Tensor], list[str]]:
    """(zoo BEATsConfig, zoo ``BEATsEncoder`` state dict, notes) from an official BEATs ``.pt``."""
    from zoo.convert.beats import BEATsCheckpointError, convert_state_dict, infer_config
    from zoo.models.beats import BEATsConfig

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or pickled objects
        raise HFCheckpointError(f"--audio-tower {path} is not a readable BEATs checkpoint ({type(err).__name__}: "
                                f"{err}); pass the official BEATs .pt (a dict with 'cfg' and 'model')") from err
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, dict) or "patch_embedding.weight" not in model:
        keys = sorted(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise HFCheckpointError(f"--audio-tower {path} is not an official BEATs checkpoint (expected a dict with "
                                f"'cfg' and 'model' holding patch_embedding.weight; got {keys}): wrong file? The "
                                "audio variant's tower is BEATs (e.g. BEATs_iter3_plus_AS2M.pt), not Whisper")
    try:
        cfg = (BEATsConfig.from_official(ckpt["cfg"]) if isinstance(ckpt.get("cfg"), dict)
               else infer_config(model))
        state, notes = convert_state_dict(model)
    except (BEATsCheckpointError, ValueError, TypeError) as err:
        raise HFCheckpointError(f"--audio-tower {path}: {err}") from err
    return cfg, state, notes


# ------------------------------------------------------------------------------------------------ Q-Former
def qformer_state_dict(aligner: dict[str, Tensor], where: str) -> tuple[Any, dict[str, Tensor]]:
    """transformers ``Blip2QFormerModel`` tensors (names after ``qformer.qformer.``) + ``query_tokens`` ->
    (zoo :class:`Blip2QFormerConfig`, :class:`Blip2QFormer` state dict)."""
    from zoo.models.qformer import Blip2QFormerConfig

    pool = TensorPool({k: v for k, v in aligner.items()})
    queries = pool.take("query_tokens")
    layers = sorted({int(m.group(1)) for k in pool.tensors if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise HFCheckpointError(f"{where}: no Blip2QFormerModel layers (model.mm_audio_aligner.qformer.qformer."
                                f"encoder.layer.N.*) in the aligner")
    dim = int(pool.tensors["layernorm.weight"].shape[0])
    cross = [i for i in layers if f"encoder.layer.{i}.crossattention.attention.key.weight" in pool.tensors]
    if cross != [i for i in layers if i % QFORMER_CROSS_EVERY == 0]:
        raise HFCheckpointError(f"{where}: cross-attention in Q-Former layers {cross}; the official aligner has it "
                                f"every {QFORMER_CROSS_EVERY} layers (0, 2, ...)")
    enc_dim = int(pool.tensors["encoder.layer.0.crossattention.attention.key.weight"].shape[1])
    mlp = int(pool.tensors["encoder.layer.0.intermediate_query.dense.weight"].shape[0])
    if dim % QFORMER_HEADS:
        raise HFCheckpointError(f"{where}: Q-Former width {dim} is not divisible by the official {QFORMER_HEADS} "
                                "heads (Blip2QFormerConfig default)")
    cfg = Blip2QFormerConfig(dim=dim, depth=len(layers), num_heads=QFORMER_HEADS, mlp_dim=mlp, encoder_dim=enc_dim,
                             num_queries=int(queries.shape[1]), cross_attention_every=QFORMER_CROSS_EVERY,
                             norm_eps=QFORMER_EPS)
    if tuple(queries.shape) != (1, cfg.num_queries, dim):
        raise HFCheckpointError(f"{where}: query_tokens {tuple(queries.shape)} do not fit the Q-Former width {dim}")
    out = {"query_tokens": queries, "query_norm.weight": pool.take("layernorm.weight"),
           "query_norm.bias": pool.take("layernorm.bias")}

    def cat(names: list[str], kind: str) -> Tensor:
        return torch.cat([pool.take(f"{n}.{kind}") for n in names])

    for i in layers:
        p, z = f"encoder.layer.{i}.", f"blocks.{i}."
        a = p + "attention.attention."
        for kind in ("weight", "bias"):
            out[z + f"attn.qkv.{kind}"] = cat([a + "query", a + "key", a + "value"], kind)
            out[z + f"attn.proj.{kind}"] = pool.take(p + f"attention.output.dense.{kind}")
            out[z + f"norm1.{kind}"] = pool.take(p + f"attention.output.LayerNorm.{kind}")
            out[z + f"mlp.fc1.{kind}"] = pool.take(p + f"intermediate_query.dense.{kind}")
            out[z + f"mlp.fc2.{kind}"] = pool.take(p + f"output_query.dense.{kind}")
            out[z + f"norm2.{kind}"] = pool.take(p + f"output_query.LayerNorm.{kind}")
            if i in cross:
                c = p + "crossattention.attention."
                out[z + f"cross.q.{kind}"] = pool.take(c + f"query.{kind}")
                out[z + f"cross.kv.{kind}"] = cat([c + "key", c + "value"], kind)
                out[z + f"cross.proj.{kind}"] = pool.take(p + f"crossattention.output.dense.{kind}")
                out[z + f"norm_cross.{kind}"] = pool.take(p + f"crossattention.output.LayerNorm.{kind}")
        # the text branch (intermediate / output, for BLIP-2's text tokens) is never run on queries
        for k in [k for k in pool.tensors if k.startswith((p + "intermediate.", p + "output."))]:
            pool.take(k)
    left = pool.left()
    if left:
        raise HFCheckpointError(f"{where}: aligner tensor(s) {left[:5]} are not part of a Blip2QFormerModel of "
                                f"{len(layers)} layers")
    return cfg, out


# ------------------------------------------------------------------------------------------------ read
def read_uni_moe_audio(checkpoint: PathLike, vision_tower: Optional[PathLike] = None,
                       audio_tower: Optional[PathLike] = None, base: Optional[PathLike] = None):
    """Read an official Uni-MoE audio-variant folder (+ towers) into :class:`zoo.convert.uni_moe.UniMoEParts`."""
    from zoo.convert.uni_moe import (UniMoEParts, _projector, decoder_config_from_layout, lm_state_dict,
                                     resolve_tower, vision_state)
    from zoo.convert.uni_moe_lora import ADAPTER_CONFIG, read_lora_finetune
    from zoo.models.uni_moe import UniMoEConfig

    checkpoint = Path(checkpoint)
    notes = [f"converted from the official Uni-MoE audio-variant checkpoint {checkpoint.name}"]
    extra_dirs: tuple[Path, ...] = ()
    if (checkpoint / ADAPTER_CONFIG).is_file():
        official, tensors, lora_notes = read_lora_finetune(checkpoint, base)
        notes += lora_notes
        extra_dirs = (Path(base), Path(base).parent)
    elif base is not None:
        raise HFCheckpointError(f"--base was given but {checkpoint} is not a LoRA fine-tune (no {ADAPTER_CONFIG}); "
                                "convert a full checkpoint without --base")
    else:
        official, tensors = read_official_tensors(checkpoint)
        for fname in _CHECKED_ADAPTERS:  # the save path's other adapter files: copies of tensors in the weights
            path = checkpoint / fname
            if path.is_file():
                for k, v in read_weight_file(path).items():
                    if k in tensors and (tensors[k].shape != v.shape or not torch.equal(tensors[k].to(v.dtype), v)):
                        raise HFCheckpointError(f"{path} and the main weights disagree on {k!r}; the folder mixes "
                                                "runs")
    if official.get("mm_video_tower"):
        raise HFCheckpointError("checkpoints with a separate video tower (mm_video_tower) are not supported")
    aligner = {k[len(ALIGNER):]: v for k, v in tensors.items() if k.startswith(ALIGNER)}
    if not any(k.startswith("qformer.qformer.") for k in aligner) or not any(k.startswith("projector.")
                                                                             for k in aligner):
        raise HFCheckpointError(f"{checkpoint}: the audio aligner (model.mm_audio_aligner.qformer.qformer.*, "
                                "model.mm_audio_aligner.projector.*) is missing from the weights and from "
                                "mm_audio_aligner.bin: copy the release's mm_audio_aligner.bin into the folder")
    if "query_tokens" not in aligner:
        raise HFCheckpointError(f"{checkpoint}: model.mm_audio_aligner.query_tokens is missing (weights and "
                                "mm_audio_aligner.bin): copy the release's mm_audio_aligner.bin into the folder")
    rest = {k: v for k, v in tensors.items() if not k.startswith(ALIGNER)}
    # the LM as the layout reader knows it: MoE in the even layers (moe_type sparse, stride 2 in its terms); the
    # aligner is handled here, so the reader sees no audio tower
    lm_cfg = {k: v for k, v in official.items() if k != "mm_audio_tower"}
    lm_cfg.update(moe_type="sparse", moe_stride=2)
    vision_folder = resolve_tower(official, "mm_vision_tower", checkpoint, vision_tower, "--vision-tower", extra_dirs)
    layout = read_uni_moe_layout(checkpoint, vision_tower_dir=vision_folder, config=lm_cfg, tensors=rest)
    s = layout.settings
    decoder = decoder_config_from_layout(layout)
    state = {f"decoder.{k}": v for k, v in lm_state_dict(layout, decoder).items()}

    vision_cfg, projector_kind = vision_state(official, layout, vision_folder, state, notes)

    beats_path = resolve_beats(official, checkpoint, audio_tower, extra_dirs)
    beats_cfg, beats_state, beats_notes = read_beats_file(beats_path)
    where = f"{checkpoint} (mm_audio_aligner)"
    q_tensors = {k[len("qformer.qformer."):]: v for k, v in aligner.items() if k.startswith("qformer.qformer.")}
    q_tensors["query_tokens"] = aligner["query_tokens"]
    blip2_cfg, q_state = qformer_state_dict(q_tensors, where)
    odd = sorted(k for k in aligner if not k.startswith(("qformer.qformer.", "projector.")) and k != "query_tokens")
    if odd:
        raise HFCheckpointError(f"{where}: unknown aligner tensor(s) {odd[:5]}")
    if blip2_cfg.encoder_dim != beats_cfg.encoder_embed_dim:
        raise HFCheckpointError(f"the Q-Former cross-attends to width {blip2_cfg.encoder_dim} but the BEATs in "
                                f"{beats_path} has width {beats_cfg.encoder_embed_dim}: wrong --audio-tower?")
    q = s["query_tokens_size"]
    if q is not None and blip2_cfg.num_queries != int(q):
        raise HFCheckpointError(f"model.mm_audio_aligner.query_tokens has {blip2_cfg.num_queries} queries, "
                                f"config.json query_tokens_size says {q}")
    audio_projector = s["audio_projector_type"]
    proj = {k[len("projector."):]: v for k, v in aligner.items() if k.startswith("projector.")}
    state.update({f"audio_encoder.{k}": v for k, v in beats_state.items()})
    state.update({f"audio_connector.qformer.{k}": v for k, v in q_state.items()})
    state.update({f"audio_connector.projector.{k}": v for k, v in
                  _projector(audio_projector, proj, "audio_projector").items()})
    notes.append(f"audio tower (BEATs) from {beats_path.name}; official 30 s windows, unmasked Q-Former padding")
    notes += beats_notes[:1]

    max_len = official.get("tokenizer_model_max_length")
    try:
        config = UniMoEConfig(vision=vision_cfg, projector=projector_kind, audio_encoder=None, audio_qformer=None,
                              audio_beats=beats_cfg, audio_blip2=blip2_cfg, audio_projector=audio_projector,
                              audio_beats_window=WINDOW_SAMPLES, audio_beats_mask_padding=False, decoder=decoder,
                              tokenizer_model_max_length=int(max_len) if max_len else None)
    except ValueError as err:
        raise HFCheckpointError(f"the official config does not give a valid zoo Uni-MoE: {err}") from err
    return UniMoEParts(config=config, state=state, vision_folder=vision_folder, audio_folder=beats_path,
                       notes=notes)


__all__ = ["is_audio_variant", "read_uni_moe_audio", "resolve_beats", "read_beats_file", "qformer_state_dict",
           "WINDOW_SAMPLES"]
