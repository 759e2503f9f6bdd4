"""BEATs audio encoder (Chen et al. 2022, "BEATs: Audio Pre-Training with Acoustic Tokenizers"), in plain torch.

Uni-MoE's official non-speech audio branch. Written to match Microsoft's official ``beats/BEATs.py`` (unilm) number
for number; ``tests/models/test_beats.py`` checks it against an output of the official code
(``tests/fixtures/beats_official``). Official checkpoints load with :func:`zoo.convert.beats.load_beats`.

Front end (:func:`beats_fbank`), the official ``preprocess``:

- 16 kHz mono float samples in [-1, 1], scaled by 2**15 (int16 range), then Kaldi's ``fbank`` with the
  defaults torchaudio's ``compliance.kaldi.fbank`` uses: 25 ms frames (400 samples) every 10 ms (160), only
  frames that fit whole (``snip_edges``), no dither, DC offset removed per frame, pre-emphasis 0.97 (first sample
  of a frame uses itself), Povey window (``hann(400, periodic=False) ** 0.85``), zero-padded to a 512-point FFT,
  power spectrum, 128 triangular filters on the HTK mel scale (``1127 ln(1 + f / 700)``) from 20 Hz to 8 kHz,
  ``log(max(energy, float32 eps))``; torchaudio is not needed.
- Normalised with fixed statistics: ``(fbank - 15.41663) / (2 * 6.55582)``. ``[B, T] -> [B, frames, 128]``.

Encoder (:class:`BEATsEncoder`):

- ``[B, 1, frames, 128]`` -> Conv2d 16x16, stride 16 (no bias) -> ``[B, E, frames // 16, 8]``, flattened time-major
  (token ``t * 8 + f``) -> LayerNorm(E) -> Linear(E, D) when ``E != D``.
- Convolutional position embedding: a grouped Conv1d over tokens (kernel ``conv_pos``, weight-normalised over
  the kernel axis, even kernels drop the last output) -> exact GELU, added to the input; then LayerNorm (post-LN).
- ``encoder_layers`` post-LN blocks with deep-norm residual scaling ``alpha = (2 L) ** 0.25``:
  ``x = LN(alpha x + Attn(x))``, ``x = LN(alpha x + FFN(x))``.
- Attention adds a relative position bias: T5-style bidirectional buckets (``num_buckets``, ``max_distance``) of
  the token distance, one bias table shared by all layers, gated per query (WavLM's gated relative position
  bias: ``g = a (b w_h - 1) + 2`` with ``a, b = sigmoid`` of a Linear of the query head summed in two groups of 4).
- Output ``[B, N, D]`` with ``N = (frames // 16) * 8``; no final LayerNorm (post-LN).

``padding_mask`` (optional, ``[B, T]`` bool, True = padded sample) follows the official code exactly, including its
reduction: samples -> frames -> tokens by cutting the trailing remainder and taking "all padded" over equal runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.layers.mlp import Mlp
from zoo.models.audio import SAMPLE_RATE, check_sample_rate, check_samples

FRAME_LENGTH = 400  # 25 ms
FRAME_SHIFT = 160  # 10 ms
N_FFT = 512  # next power of two of the frame length
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582


# ----------------------------------------------------------------------------------------------------- front end
def _mel(freq: Union[float, Tensor]) -> Union[float, Tensor]:
    if isinstance(freq, Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


def kaldi_mel_banks(num_bins: int = 128, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                    low_freq: float = LOW_FREQ) -> Tensor:
    """Kaldi's triangular mel filters ``[num_bins, n_fft // 2 + 1]`` (float32; the Nyquist column is zero)."""
    high_freq = sample_rate / 2
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left, centre, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
    mel = _mel((sample_rate / n_fft) * torch.arange(n_fft // 2)).unsqueeze(0)
    up, down = (mel - left) / (centre - left), (right - mel) / (right - centre)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(banks, (0, 1))


def kaldi_fbank(waveform: Tensor, num_mel_bins: int = 128) -> Tensor:
    """One clip ``[T]`` (already in int16 scale) -> log mel filterbank ``[frames, num_mel_bins]``, Kaldi's recipe as
    in the module docstring (``torchaudio.compliance.kaldi.fbank`` with BEATs' arguments)."""
    frames = waveform.unfold(0, FRAME_LENGTH, FRAME_SHIFT)  # [m, 400], only whole frames
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - PREEMPHASIS * previous
    window = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=frames.dtype, device=frames.device).pow(0.85)
    frames = F.pad(frames * window, (0, N_FFT - FRAME_LENGTH))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    banks = kaldi_mel_banks(num_mel_bins).to(device=power.device, dtype=power.dtype)
    energies = power @ banks.T
    eps = torch.tensor(torch.finfo(torch.float).eps, device=power.device, dtype=power.dtype)
    return torch.maximum(energies, eps).log()


def min_samples(patch_size: int = 16) -> int:
    """The shortest clip that gives one token: ``patch_size`` whole frames."""
    return FRAME_LENGTH + (patch_size - 1) * FRAME_SHIFT


def check_beats_audio(audio: Union[Tensor, np.ndarray], sample_rate: int, patch_size: int = 16) -> Tensor:
    """``[T]`` or ``[B, T]`` float samples at 16 kHz -> ``[B, T]`` float32, or a ValueError saying what is wrong."""
    check_sample_rate(sample_rate, "BEATs' Kaldi fbank front end")
    audio = torch.as_tensor(audio)
    if audio.dim() == 1:
        audio = audio.unsqueeze(0)
    if audio.dim() != 2:
        raise ValueError(f"audio must be [samples] or [batch, samples] (mono, clips of equal length), got shape "
                         f"{tuple(audio.shape)}; average the channels first and pad clips to one length (pass "
                         "padding_mask)")
    if audio.shape[0] == 0:
        raise ValueError("audio batch is empty (0 clips); there is nothing to encode")
    if audio.shape[1] == 0:
        raise ValueError("audio clip is empty (0 samples); there is nothing to encode")
    need = min_samples(patch_size)
    if audio.shape[1] < need:
        raise ValueError(f"audio clip has {audio.shape[1]} samples ({audio.shape[1] / SAMPLE_RATE:.3f} s) but BEATs "
                         f"needs at least {need} ({need / SAMPLE_RATE:.3f} s at {SAMPLE_RATE} Hz): {patch_size} "
                         f"frames of 25 ms every 10 ms make one patch; pad the clip")
    return check_samples(audio)


def beats_fbank(audio: Tensor, num_mel_bins: int = 128, mean: float = FBANK_MEAN, std: float = FBANK_STD) -> Tensor:
    """``[B, T]`` float samples in [-1, 1] -> normalised fbank ``[B, frames, num_mel_bins]`` (official preprocess)."""
    fbank = torch.stack([kaldi_fbank(clip * 2 ** 15, num_mel_bins) for clip in audio])
    return (fbank - mean) / (2 * std)


def reduce_padding_mask(padding_mask: Tensor, length: int) -> Tensor:
    """The official ``forward_padding_mask``: ``[B, S]`` -> ``[B, length]``, trailing ``S % length`` dropped, a
    position padded when every one of its ``S // length`` entries is."""
    extra = padding_mask.size(1) % length
    if extra > 0:
        padding_mask = padding_mask[:, :-extra]
    return padding_mask.view(padding_mask.size(0), length, -1).all(-1)


# ------------------------------------------------------------------------------------------------------- config
@dataclass
class BEATsConfig:
    """Defaults: the released BEATs iter3 / iter3+ checkpoints (90M)."""

    input_patch_size: int = 16
    embed_dim: int = 512  # patch embedding width E
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768  # D
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False  # pre-LN variant (no released checkpoint uses it)
    deep_norm: bool = True
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    num_mel_bins: int = 128
    fbank_mean: float = FBANK_MEAN
    fbank_std: float = FBANK_STD
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0  # on the encoder input and inside blocks (the official default 0.1 is for training)
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(f"encoder_embed_dim={self.encoder_embed_dim} must be divisible by "
                             f"encoder_attention_heads={self.encoder_attention_heads}")
        if self.num_mel_bins % self.input_patch_size:
            raise ValueError(f"num_mel_bins={self.num_mel_bins} must be a multiple of input_patch_size="
                             f"{self.input_patch_size}")
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("deep_norm and layer_norm_first exclude each other (as in the official code)")
        if self.activation_fn != "gelu":
            raise ValueError(f"activation_fn={self.activation_fn!r}; only 'gelu' (every released BEATs) is built")
        if self.gru_rel_pos and self.encoder_embed_dim // self.encoder_attention_heads < 1:
            raise ValueError("gru_rel_pos needs a head dimension")

    @classmethod
    def from_official(cls, cfg: Mapping[str, Any]) -> "BEATsConfig":
        """From an official checkpoint's ``cfg`` dict; training-only keys (dropouts, layerdrop, gradient decay,
        predictor) are ignored, a fine-tuned model's classifier is not built."""
        known = {f.name for f in fields(cls)} - {"dropout", "attention_dropout", "num_mel_bins", "fbank_mean",
                                                 "fbank_std", "layer_norm_eps"}
        kwargs = {k: v for k, v in cfg.items() if k in known}
        # The official BEATsConfig's own defaults differ from ours for these: an absent key means THEIR default.
        official_defaults = {"input_patch_size": -1, "deep_norm": False, "relative_position_embedding": False,
                             "max_distance": 1280, "gru_rel_pos": False}
        for k, v in official_defaults.items():
            kwargs.setdefault(k, v)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------ modules
def relative_position_buckets(query_len: int, key_len: int, num_buckets: int, max_distance: int,
                              device: Optional[torch.device] = None) -> Tensor:
    """T5's bidirectional buckets of ``key - query`` ``[query_len, key_len]`` (long): half the buckets per sign,
    exact below ``num_buckets // 4``, logarithmic up to ``max_distance``, clipped to the last bucket."""
    rel = torch.arange(key_len, device=device)[None, :] - torch.arange(query_len, device=device)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    max_exact = half // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).long()
    large = torch.clamp(large, max=half - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


class BEATsAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections and an optional gated relative position bias."""

    def __init__(self, dim: int, num_heads: int, gated: bool, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)
        self.gated = gated
        if gated:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, num_heads, 1, 1))
        self.attn_drop = attn_drop

    def forward(self, x: Tensor, position_bias: Optional[Tensor] = None,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x [B, N, D]``, ``position_bias [H, N, N]``, ``padding_mask [B, N]`` (True = padded key)."""
        B, N, D = x.shape
        heads = lambda t: t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q_raw, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        bias = None
        if position_bias is not None:
            bias = position_bias.unsqueeze(0)  # [1, H, N, N]
            if self.gated:
                gate_a, gate_b = torch.sigmoid(self.grep_linear(q_raw).view(B, self.num_heads, N, 2, 4).sum(-1)
                                               ).chunk(2, dim=-1)
                gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0  # [B, H, N, 1]
                bias = gate * bias
        if padding_mask is not None:
            pad = torch.zeros(B, 1, 1, N, dtype=x.dtype, device=x.device).masked_fill(
                padding_mask[:, None, None, :], float("-inf"))
            bias = pad if bias is None else bias + pad
        out = F.scaled_dot_product_attention(q_raw, k, v, attn_mask=bias, scale=self.scaling,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class BEATsLayer(nn.Module):
    """One block: post-LN with deep-norm residual scale (the released models) or pre-LN."""

    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        D = cfg.encoder_embed_dim
        self.pre_norm = cfg.layer_norm_first
        self.alpha = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0
        self.attn = BEATsAttention(D, cfg.encoder_attention_heads, cfg.gru_rel_pos and
                                   cfg.relative_position_embedding, cfg.attention_dropout)
        self.norm1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(D, cfg.encoder_ffn_embed_dim, activation=cfg.activation_fn)
        self.norm2 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, position_bias: Optional[Tensor], padding_mask: Optional[Tensor]) -> Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), position_bias, padding_mask))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x * self.alpha + self.drop(self.attn(x, position_bias, padding_mask)))
        return self.norm2(x * self.alpha + self.drop(self.mlp(x)))


class WeightNormConv1d(nn.Module):
    """Conv1d whose weight is ``weight_v * weight_g / ||weight_v||`` with the norm taken over all axes but the
    kernel axis (``torch.nn.utils.weight_norm(conv, dim=2)``, the official layout: ``weight_g [1, 1, K]``)."""

    def __init__(self, dim: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.padding, self.groups = kernel_size // 2, groups
        self.weight_v = nn.Parameter(torch.empty(dim, dim // groups, kernel_size))
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim))
        std = math.sqrt(4.0 / (kernel_size * dim))
        with torch.no_grad():
            nn.init.normal_(self.weight_v, mean=0.0, std=std)
            self.weight_g.copy_(self.weight_v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class BEATsEncoder(nn.Module):
    """Waveform ``[B, T]`` (16 kHz) -> ``[B, N, D]``; see the module docstring. ``forward_fbank`` takes the
    normalised fbank ``[B, frames, num_mel_bins]`` instead."""

    def __init__(self, cfg: Optional[BEATsConfig] = None) -> None:
        super().__init__()
        cfg = cfg or BEATsConfig()
        self.cfg = cfg
        E, D, P = cfg.embed_dim, cfg.encoder_embed_dim, cfg.input_patch_size
        self.patch_embed = nn.Conv2d(1, E, kernel_size=P, stride=P, bias=cfg.conv_bias)
        self.patch_norm = nn.LayerNorm(E, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(E, D) if E != D else None
        self.pos_conv = WeightNormConv1d(D, cfg.conv_pos, cfg.conv_pos_groups)
        self.rel_pos_bias = (nn.Embedding(cfg.num_buckets, cfg.encoder_attention_heads)
                             if cfg.relative_position_embedding else None)
        self.blocks = nn.ModuleList(BEATsLayer(cfg) for _ in range(cfg.encoder_layers))
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)  # after pos conv (post-LN) or at the end (pre-LN)
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def dim(self) -> int:
        return self.cfg.encoder_embed_dim

    def num_tokens(self, num_samples: int) -> int:
        frames = 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT
        P = self.cfg.input_patch_size
        return (frames // P) * (self.cfg.num_mel_bins // P)

    def position_bias(self, n: int, device: torch.device) -> Optional[Tensor]:
        if self.rel_pos_bias is None:
            return None
        buckets = relative_position_buckets(n, n, self.cfg.num_buckets, self.cfg.max_distance, device)
        return self.rel_pos_bias(buckets).permute(2, 0, 1)  # [H, N, N]

    def forward_fbank(self, fbank: Tensor, frame_padding_mask: Optional[Tensor] = None
                      ) -> Tuple[Tensor, Optional[Tensor]]:
        """``fbank [B, frames, num_mel_bins]`` -> ``([B, N, D], token padding mask [B, N] or None)``."""
        cfg = self.cfg
        if fbank.dim() != 3 or fbank.shape[-1] != cfg.num_mel_bins:
            raise ValueError(f"fbank must be [B, frames, {cfg.num_mel_bins}], got {tuple(fbank.shape)}")
        if fbank.shape[1] < cfg.input_patch_size:
            raise ValueError(f"fbank has {fbank.shape[1]} frames; one patch needs {cfg.input_patch_size}")
        x = self.patch_embed(fbank.unsqueeze(1).to(self.patch_embed.weight.dtype))  # [B, E, T', F']
        x = self.patch_norm(x.flatten(2).transpose(1, 2))  # token t * F' + f
        mask = None if frame_padding_mask is None else reduce_padding_mask(frame_padding_mask, x.shape[1])
        if self.proj is not None:
            x = self.proj(x)
        x = self.drop(x)
        if mask is not None:
            x = x.masked_fill(mask.unsqueeze(-1), 0.0)
        conv = self.pos_conv(x.transpose(1, 2))
        if cfg.conv_pos % 2 == 0:
            conv = conv[:, :, :-1]
        x = x + F.gelu(conv).transpose(1, 2)
        if not cfg.layer_norm_first:
            x = self.norm(x)
        x = self.drop(x)
        bias = self.position_bias(x.shape[1], x.device)
        for block in self.blocks:
            x = block(x, bias, mask)
        if cfg.layer_norm_first:
            x = self.norm(x)
        return x, mask

    def extract_features(self, audio: Union[Tensor, np.ndarray], sample_rate: int = SAMPLE_RATE,
                         padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """``audio [B, T]`` or ``[T]`` float in [-1, 1], ``padding_mask [B, T]`` bool (True = padded sample) ->
        ``([B, N, D], token padding mask [B, N] or None)``, like the official ``extract_features``."""
        audio = check_beats_audio(audio, sample_rate, self.cfg.input_patch_size)
        if padding_mask is not None:
            padding_mask = torch.as_tensor(padding_mask, device=audio.device)
            if padding_mask.dim() == 1:
                padding_mask = padding_mask.unsqueeze(0)
            if padding_mask.shape != audio.shape or padding_mask.dtype != torch.bool:
                raise ValueError(f"padding_mask must be bool {tuple(audio.shape)} like the audio (True = padded "
                                 f"sample), got {padding_mask.dtype} {tuple(padding_mask.shape)}")
        audio = audio.to(self.patch_embed.weight.device)
        fbank = beats_fbank(audio, self.cfg.num_mel_bins, self.cfg.fbank_mean, self.cfg.fbank_std)
        frame_mask = None if padding_mask is None else reduce_padding_mask(padding_mask.to(audio.device),
                                                                           fbank.shape[1])
        return self.forward_fbank(fbank, frame_mask)

    def forward(self, audio: Union[Tensor, np.ndarray], sample_rate: int = SAMPLE_RATE,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """``[B, T]`` (or ``[T]``) 16 kHz float samples -> ``[B, N, D]``."""
        return self.extract_features(audio, sample_rate, padding_mask)[0]


__all__ = ["BEATsConfig", "BEATsEncoder", "beats_fbank", "kaldi_fbank", "kaldi_mel_banks", "check_beats_audio",
           "relative_position_buckets", "reduce_padding_mask", "SAMPLE_RATE"]
