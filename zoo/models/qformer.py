"""Query transformers that turn a variable number of audio-encoder frames into a fixed number of tokens.

- :class:`WhisperQFormer`: a Whisper DECODER used as a Q-Former, as in Uni-MoE's speech connector: learnable query
  vectors go in as the decoder's input embeddings (the decoder's learned position table is added), then
  causal self-attention among the queries, cross-attention to the Whisper encoder output, MLP, each pre-LN, and a
  final LayerNorm. No token embedding, no LM head. Loads from a Hugging Face Whisper checkpoint's ``decoder.*``
  (:mod:`zoo.convert.hf_whisper`).
- :class:`SpeechConnector`: Uni-MoE's speech path after the encoder: query tokens ``[1, Q, D]`` (zeros at init, as
  the official code), the Whisper Q-Former, then a projector (``linear`` or ``mlp2x_gelu``) into the LM width.
  Uni-MoE encodes every 30 s window on its own and concatenates the windows' Q tokens in order (official
  ``query_tokens_size`` default: 50), see :func:`encode_speech`.
- :class:`Blip2QFormer`: a BLIP-2-style Q-Former (BERT-like post-LN blocks; cross-attention every
  ``cross_attention_every`` blocks) for the non-speech audio variant (Uni-MoE's audio model uses one over BEATs
  features). Left out: BLIP-2's text branch (word embeddings, text-only FFN, the shared self-attention with text
  tokens) and its pre-training heads (ITC / ITM / ITG); only the query path that produces the visual/audio tokens
  is here.

Masks: ``encoder_mask`` ``[B, S]`` bool, True = real encoder frame; padded frames receive no cross-attention, so
they do not change the outputs. Every row needs at least one real frame (checked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from zoo.layers import Attention, CrossAttention, Mlp
from zoo.models.audio import WHISPER_SHAPES, WhisperEncoder
from zoo.models.connectors import Projector

UNI_MOE_NUM_QUERIES = 50  # Uni-MoE speech: DataArguments.query_tokens_size default


def _check_encoder_inputs(encoder_out: Tensor, encoder_mask: Optional[Tensor], encoder_dim: int) -> None:
    if encoder_out.dim() != 3 or encoder_out.shape[-1] != encoder_dim:
        raise ValueError(f"encoder output must be [B, S, {encoder_dim}], got {tuple(encoder_out.shape)}")
    if encoder_mask is not None:
        if encoder_mask.shape != encoder_out.shape[:2]:
            raise ValueError(f"encoder_mask must be [B, S] = {tuple(encoder_out.shape[:2])}, got "
                             f"{tuple(encoder_mask.shape)}")
        # Host read on purpose: a row with no real frame would give NaN tokens silently.
        if not bool(encoder_mask.bool().any(dim=1).all()):
            raise ValueError("encoder_mask has a row with no real frame; every clip needs at least one frame")


@dataclass
class WhisperQFormerConfig:
    """Whisper decoder shape used as a Q-Former: width ``dim``, ``depth`` blocks, ``num_heads``, MLP ``mlp_dim``,
    ``max_positions`` (the decoder's learned position table, 448 in every released Whisper), ``encoder_dim``
    (None = ``dim``, as in Whisper), ``num_queries`` Q (at most ``max_positions``)."""

    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 448
    encoder_dim: Optional[int] = None
    num_queries: int = UNI_MOE_NUM_QUERIES
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if not 1 <= self.num_queries <= self.max_positions:
            raise ValueError(f"num_queries={self.num_queries} must be in [1, max_positions={self.max_positions}]: "
                             "each query takes one position of the decoder's table")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")

    @classmethod
    def preset(cls, name: str, num_queries: int = UNI_MOE_NUM_QUERIES) -> "WhisperQFormerConfig":
        """The decoder of a Whisper size (same names as :data:`zoo.models.audio.WHISPER_SHAPES`)."""
        if name not in WHISPER_SHAPES:
            raise ValueError(f"unknown Whisper shape {name!r}; known: {', '.join(WHISPER_SHAPES)}")
        shape = {k: v for k, v in WHISPER_SHAPES[name].items() if k != "n_mels"}
        return cls(**shape, num_queries=num_queries)


class WhisperDecoderBlock(nn.Module):
    """``x + attn(norm1(x), causal)``, ``x + cross(norm_cross(x), encoder_out)``, ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: WhisperQFormerConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.num_heads)
        self.norm_cross = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.cross = CrossAttention(cfg.dim, cfg.num_heads, context_dim=cfg.encoder_dim or cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim, activation="gelu")

    def forward(self, x: Tensor, encoder_out: Tensor, encoder_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.norm1(x), causal=True)  # the Whisper decoder is causal, also over the queries
        x = x + self.cross(self.norm_cross(x), encoder_out, encoder_mask)
        return x + self.mlp(self.norm2(x))


class WhisperQFormer(nn.Module):
    """``forward(queries [B, Q, D], encoder_out [B, S, De], encoder_mask [B, S] | None) -> [B, Q, D]``.

    Parameters: ``pos_embed`` ``[max_positions, D]`` (learned; rows 0..Q-1 are added to the queries), ``blocks``,
    ``norm`` (final LayerNorm)."""

    def __init__(self, config: WhisperQFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.pos_embed = nn.Parameter(torch.zeros(config.max_positions, config.dim))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(WhisperDecoderBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)

    def forward(self, queries: Tensor, encoder_out: Tensor, encoder_mask: Optional[Tensor] = None) -> Tensor:
        cfg = self.config
        if queries.dim() != 3 or queries.shape[-1] != cfg.dim or queries.shape[1] > cfg.max_positions:
            raise ValueError(f"queries must be [B, Q <= {cfg.max_positions}, {cfg.dim}], got {tuple(queries.shape)}")
        _check_encoder_inputs(encoder_out, encoder_mask, cfg.encoder_dim or cfg.dim)
        x = queries + self.pos_embed[: queries.shape[1]].to(queries.dtype)
        for block in self.blocks:
            x = block(x, encoder_out, encoder_mask)
        return self.norm(x)


class SpeechConnector(nn.Module):
    """Uni-MoE's speech aligner: ``forward(encoder_out [B, S, De], encoder_mask [B, S] | None) -> [B, Q, D_lm]``.

    Parameters: ``query_tokens`` ``[1, Q, D]`` (zeros at init, as the official), ``qformer``
    (:class:`WhisperQFormer`), ``projector`` (:class:`~zoo.models.connectors.Projector`, ``linear`` by default as
    the official ``audio_projector_type``)."""

    def __init__(self, qformer: WhisperQFormerConfig, lm_dim: int, projector: str = "linear") -> None:
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, qformer.num_queries, qformer.dim))
        self.qformer = WhisperQFormer(qformer)
        self.projector = Projector(projector, qformer.dim, lm_dim)

    @property
    def num_queries(self) -> int:
        return self.query_tokens.shape[1]

    def forward(self, encoder_out: Tensor, encoder_mask: Optional[Tensor] = None) -> Tensor:
        queries = self.query_tokens.expand(encoder_out.shape[0], -1, -1).to(encoder_out.dtype)
        return self.projector(self.qformer(queries, encoder_out, encoder_mask))


def encode_speech(encoder: WhisperEncoder, connector: SpeechConnector, features: Tensor) -> Tensor:
    """One clip's windows ``[N, n_mels, 3000]`` (from :func:`zoo.models.audio.audio_features`) -> its LM tokens
    ``[N * Q, D_lm]``, window by window in order (Uni-MoE encodes each 30 s window separately and concatenates)."""
    return connector(encoder(features)).flatten(0, 1)


@dataclass
class Blip2QFormerConfig:
    """BLIP-2 Q-Former query path: ``num_queries`` (32 in BLIP-2), width ``dim``, ``depth``, ``num_heads``,
    ``mlp_dim``, ``encoder_dim`` (the audio/vision feature width), cross-attention in blocks 0, k, 2k, ... for
    ``cross_attention_every`` = k (BLIP-2: 2), LayerNorm ``norm_eps`` (BERT: 1e-12)."""

    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    encoder_dim: int = 768
    num_queries: int = 32
    cross_attention_every: int = 2
    norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "num_heads", "mlp_dim", "encoder_dim", "num_queries", "cross_attention_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")


class Blip2QFormerBlock(nn.Module):
    """BERT-style post-LN: ``x = norm1(x + attn(x))``; with cross-attention ``x = norm_cross(x + cross(x, enc))``;
    ``x = norm2(x + mlp(x))``. Self-attention is bidirectional among the queries."""

    def __init__(self, cfg: Blip2QFormerConfig, has_cross: bool) -> None:
        super().__init__()
        self.attn = Attention(cfg.dim, cfg.num_heads)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.cross = CrossAttention(cfg.dim, cfg.num_heads, context_dim=cfg.encoder_dim) if has_cross else None
        self.norm_cross = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if has_cross else None
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim, activation="gelu")
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: Tensor, encoder_out: Tensor, encoder_mask: Optional[Tensor] = None) -> Tensor:
        x = self.norm1(x + self.attn(x))
        if self.cross is not None:
            x = self.norm_cross(x + self.cross(x, encoder_out, encoder_mask))
        return self.norm2(x + self.mlp(x))


class Blip2QFormer(nn.Module):
    """``forward(encoder_out [B, S, De], encoder_mask [B, S] | None) -> [B, Q, D]``.

    Parameters: ``query_tokens`` ``[1, Q, D]`` (normal(0.02) at init, as BLIP-2), ``query_norm`` (BLIP-2's
    LayerNorm on the query embeddings), ``blocks``. Uni-MoE's audio aligner feeds such a Q-Former (transformers'
    ``Blip2QFormerModel``) 50 query tokens that start at zero: use ``num_queries=50`` and zero ``query_tokens``."""

    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_queries, config.dim))
        nn.init.normal_(self.query_tokens, std=0.02)
        self.query_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.blocks = nn.ModuleList(Blip2QFormerBlock(config, i % config.cross_attention_every == 0)
                                    for i in range(config.depth))

    def forward(self, encoder_out: Tensor, encoder_mask: Optional[Tensor] = None) -> Tensor:
        _check_encoder_inputs(encoder_out, encoder_mask, self.config.encoder_dim)
        x = self.query_norm(self.query_tokens.expand(encoder_out.shape[0], -1, -1).to(encoder_out.dtype))
        for block in self.blocks:
            x = block(x, encoder_out, encoder_mask)
        return x


class Blip2AudioConnector(nn.Module):
    """The aligner of Uni-MoE's audio (non-speech) variant: a BLIP-2 Q-Former over the encoder output, then a
    projector into the LM: ``forward(encoder_out [B, S, De], encoder_mask [B, S] | None) -> [B, Q, D_lm]`` (the
    same contract as :class:`SpeechConnector`, so a model takes either).

    Parameters: ``qformer`` (:class:`Blip2QFormer`, its ``query_tokens`` zero at init as the official aligner's),
    ``projector`` (:class:`~zoo.models.connectors.Projector`)."""

    def __init__(self, qformer: Blip2QFormerConfig, lm_dim: int, projector: str = "linear") -> None:
        super().__init__()
        self.qformer = Blip2QFormer(qformer)
        with torch.no_grad():
            self.qformer.query_tokens.zero_()
        self.projector = Projector(projector, qformer.dim, lm_dim)

    @property
    def num_queries(self) -> int:
        return self.qformer.query_tokens.shape[1]

    def forward(self, encoder_out: Tensor, encoder_mask: Optional[Tensor] = None) -> Tensor:
        return self.projector(self.qformer(encoder_out, encoder_mask))

