"""Hugging Face Whisper folders -> :class:`zoo.models.audio.WhisperEncoder` and (the decoder as a Q-Former)
:class:`zoo.models.qformer.WhisperQFormer`, read with :mod:`zoo.convert.hf_files` (transformers not needed).

Tensor names are ``encoder.*`` / ``decoder.*`` (``WhisperModel``) or ``model.encoder.*`` / ``model.decoder.*``
(``WhisperForConditionalGeneration``, which may also store ``proj_out.weight``). Every tensor is mapped, or is one of
the named unused parts (the decoder's token table ``decoder.embed_tokens.weight`` and the LM head ``proj_out``: the
Q-Former takes query vectors, not tokens; all of ``decoder.*`` when only the encoder is asked for). Anything else,
or a tensor the config implies but the folder lacks, is an :class:`HFCheckpointError` naming it.

Key map (``encoder.`` side -> :class:`WhisperEncoder`):

- ``conv1``, ``conv2`` -> ``conv1``, ``conv2``; ``embed_positions.weight`` -> ``pos_embed`` (the stored table)
- ``layers.{i}.self_attn.{q,k,v}_proj`` -> ``transformer.blocks.{i}.attn.qkv`` (rows ``[q | k | v]``; Whisper's
  ``k_proj`` has no bias, so its part of the fused bias is zero), ``self_attn.out_proj`` -> ``attn.proj``,
  ``self_attn_layer_norm`` -> ``norm1``, ``final_layer_norm`` -> ``norm2``, ``fc1/fc2`` -> ``mlp.fc1/fc2``
- ``layer_norm`` -> ``transformer.norm``

(``decoder.`` side -> :class:`WhisperQFormer`): ``embed_positions.weight`` -> ``pos_embed``; per block the self
attention as above, ``encoder_attn.q_proj`` -> ``cross.q``, ``encoder_attn.{k,v}_proj`` -> ``cross.kv`` (rows
``[k | v]``, zero k bias), ``encoder_attn.out_proj`` -> ``cross.proj``, ``encoder_attn_layer_norm`` ->
``norm_cross``; ``layer_norm`` -> ``norm``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from zoo.convert.hf_files import HFCheckpointError, TensorPool, read_hf_folder
from zoo.models.audio import WhisperEncoder, WhisperEncoderConfig
from zoo.models.qformer import UNI_MOE_NUM_QUERIES, WhisperQFormer, WhisperQFormerConfig

PathLike = Union[str, Path]

# transformers' WhisperConfig defaults: a config.json may omit keys equal to them.
_DEFAULTS = {"d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
             "decoder_layers": 4, "decoder_attention_heads": 6, "decoder_ffn_dim": 1536, "num_mel_bins": 80,
             "max_source_positions": 1500, "max_target_positions": 448, "activation_function": "gelu"}
_UNUSED = ("decoder.embed_tokens.weight", "proj_out.weight")


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    return cfg.get(key, _DEFAULTS[key])


def whisper_configs(hf_config: Mapping[str, Any], num_queries: int = UNI_MOE_NUM_QUERIES
                    ) -> tuple[WhisperEncoderConfig, WhisperQFormerConfig]:
    """The zoo configs of a Whisper ``config.json`` (``num_queries`` is the Q-Former's own choice)."""
    if hf_config.get("model_type") != "whisper":
        raise HFCheckpointError(f"config.json has model_type {hf_config.get('model_type')!r}; this converter reads "
                                "'whisper' folders")
    act = _get(hf_config, "activation_function")
    if act != "gelu":
        raise HFCheckpointError(f"Whisper activation_function {act!r} is not supported (released models use 'gelu')")
    d = _get(hf_config, "d_model")
    enc = WhisperEncoderConfig(n_mels=_get(hf_config, "num_mel_bins"), dim=d, depth=_get(hf_config, "encoder_layers"),
                               num_heads=_get(hf_config, "encoder_attention_heads"),
                               mlp_dim=_get(hf_config, "encoder_ffn_dim"),
                               max_positions=_get(hf_config, "max_source_positions"))
    dec = WhisperQFormerConfig(dim=d, depth=_get(hf_config, "decoder_layers"),
                               num_heads=_get(hf_config, "decoder_attention_heads"),
                               mlp_dim=_get(hf_config, "decoder_ffn_dim"),
                               max_positions=_get(hf_config, "max_target_positions"), num_queries=num_queries)
    return enc, dec


def _fused(pool: TensorPool, names: list[str]) -> tuple[Tensor, Tensor]:
    """Concatenated weights of ``names`` (Linear layers) and their biases, zeros where a layer has none."""
    weights = [pool.take(f"{n}.weight") for n in names]
    biases = [pool.take(f"{n}.bias") if f"{n}.bias" in pool else torch.zeros(w.shape[0], dtype=w.dtype)
              for n, w in zip(names, weights)]
    return torch.cat(weights), torch.cat(biases)


def _take_norm(pool: TensorPool, out: dict[str, Tensor], zoo_name: str, hf_name: str) -> None:
    pool.take_linear(out, zoo_name, hf_name, bias=True)  # same .weight / .bias pair as a Linear


def _self_attention(pool: TensorPool, out: dict[str, Tensor], zoo: str, hf: str) -> None:
    out[f"{zoo}.qkv.weight"], out[f"{zoo}.qkv.bias"] = _fused(pool, [f"{hf}.{p}_proj" for p in "qkv"])
    pool.take_linear(out, f"{zoo}.proj", f"{hf}.out_proj", bias=True)


def encoder_state_dict(pool: TensorPool, prefix: str, cfg: WhisperEncoderConfig) -> dict[str, Tensor]:
    """:class:`WhisperEncoder` state dict from the tensors under ``prefix`` (e.g. ``"encoder."``)."""
    out: dict[str, Tensor] = {}
    for conv in ("conv1", "conv2"):
        pool.take_linear(out, conv, prefix + conv, bias=True)
    out["pos_embed"] = pool.take(prefix + "embed_positions.weight")
    for i in range(cfg.depth):
        _take_block(pool, out, f"transformer.blocks.{i}", f"{prefix}layers.{i}")
    _take_norm(pool, out, "transformer.norm", prefix + "layer_norm")
    return out


def _take_block(pool: TensorPool, out: dict[str, Tensor], zoo: str, hf: str) -> None:
    """What Whisper encoder and decoder layers share: self-attention, its norm, the final norm and the MLP."""
    _self_attention(pool, out, f"{zoo}.attn", f"{hf}.self_attn")
    _take_norm(pool, out, f"{zoo}.norm1", f"{hf}.self_attn_layer_norm")
    _take_norm(pool, out, f"{zoo}.norm2", f"{hf}.final_layer_norm")
    for fc in ("fc1", "fc2"):
        pool.take_linear(out, f"{zoo}.mlp.{fc}", f"{hf}.{fc}", bias=True)


def qformer_state_dict(pool: TensorPool, prefix: str, cfg: WhisperQFormerConfig) -> dict[str, Tensor]:
    """:class:`WhisperQFormer` state dict from the decoder tensors under ``prefix`` (e.g. ``"decoder."``)."""
    out: dict[str, Tensor] = {"pos_embed": pool.take(prefix + "embed_positions.weight")}
    for i in range(cfg.depth):
        hf, zoo = f"{prefix}layers.{i}", f"blocks.{i}"
        _take_block(pool, out, zoo, hf)
        pool.take_linear(out, f"{zoo}.cross.q", f"{hf}.encoder_attn.q_proj", bias=True)
        out[f"{zoo}.cross.kv.weight"], out[f"{zoo}.cross.kv.bias"] = _fused(
            pool, [f"{hf}.encoder_attn.k_proj", f"{hf}.encoder_attn.v_proj"])
        pool.take_linear(out, f"{zoo}.cross.proj", f"{hf}.encoder_attn.out_proj", bias=True)
        _take_norm(pool, out, f"{zoo}.norm_cross", f"{hf}.encoder_attn_layer_norm")
    _take_norm(pool, out, "norm", prefix + "layer_norm")
    return out


def _load_strict(module: torch.nn.Module, state: dict[str, Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise HFCheckpointError(f"{what}: no checkpoint tensor for {missing[:5]} ({len(missing)} in all)")
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if v.shape != own[k].shape]
    if bad:
        raise HFCheckpointError(f"{what}: config.json and weights disagree on shapes: {bad[:3]}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def load_whisper(folder: PathLike, *, decoder: bool = True, num_queries: int = UNI_MOE_NUM_QUERIES,
                 tensors: Optional[dict[str, Tensor]] = None, hf_config: Optional[Mapping[str, Any]] = None
                 ) -> tuple[WhisperEncoder, Optional[WhisperQFormer]]:
    """``(WhisperEncoder, WhisperQFormer or None)`` with the weights of a Whisper checkpoint folder (float32).

    ``decoder=False`` loads only the encoder (the decoder's tensors are then known and unused). ``tensors`` /
    ``hf_config`` may be given instead of reading ``folder`` (e.g. tensors already read from a multimodal
    checkpoint)."""
    if tensors is None or hf_config is None:
        read_config, read_tensors = read_hf_folder(folder)
        hf_config = read_config if hf_config is None else hf_config
        tensors = read_tensors if tensors is None else tensors
    enc_cfg, dec_cfg = whisper_configs(hf_config, num_queries)
    root = "model." if any(k.startswith("model.encoder.") for k in tensors) else ""
    ignored = tuple(root + u if u.startswith("decoder.") else u for u in _UNUSED)
    pool = TensorPool(tensors)
    encoder = WhisperEncoder(enc_cfg)
    _load_strict(encoder, encoder_state_dict(pool, root + "encoder.", enc_cfg), "Whisper encoder")
    qformer = None
    if decoder:
        qformer = WhisperQFormer(dec_cfg)
        _load_strict(qformer, qformer_state_dict(pool, root + "decoder.", dec_cfg), "Whisper decoder (Q-Former)")
    left = [n for n in pool.left() if n not in ignored and (decoder or not n.startswith(root + "decoder."))]
    if left:
        raise HFCheckpointError(f"{len(left)} checkpoint tensor(s) not understood by the Whisper converter, e.g. "
                                f"{left[:5]}; the folder is not a plain Whisper model (or its config.json has "
                                "fewer layers than its weights)")
    return encoder, qformer
