"""Speech front end and encoder of Whisper, in plain torch (no transformers / librosa at runtime).

Front end (what Whisper's feature extractor computes, re-derived from the published recipe):

- 16 kHz mono audio, cut into 30-second windows (480,000 samples); each window is zero-padded at the end or
  trimmed to exactly 480,000 samples.
- STFT: ``n_fft`` 400 (25 ms), hop 160 (10 ms), periodic Hann window, centred frames with reflect padding; the
  power spectrum ``|X|^2``; the last frame is dropped, so a window gives 3,000 frames.
- Mel filterbank: ``n_mels`` (80, or 128 for large-v3) triangular filters from 0 to 8 kHz on the Slaney mel scale
  (linear below 1 kHz, logarithmic above) with Slaney area normalisation (each filter scaled by
  ``2 / (upper edge - lower edge)``): librosa's default, which Whisper uses.
- ``log10(max(mel, 1e-10))``, then clamped from below at (its maximum over the window - 8), then ``(x + 4) / 4``.

Longer audio is split into 30 s windows in order, the way Uni-MoE's data code does (see :func:`split_windows`):
each window becomes one ``[n_mels, 3000]`` feature and is encoded on its own.

Encoder (:class:`WhisperEncoder`): ``conv1`` (k3, pad 1) -> GELU -> ``conv2`` (k3, stride 2, pad 1) -> GELU ->
+ sinusoidal position embedding -> pre-LN transformer blocks (the zoo's :class:`~zoo.models.transformer.Transformer`,
exact GELU MLP, LayerNorm eps 1e-5) -> final LayerNorm. ``[B, n_mels, 3000] -> [B, 1500, D]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.models.transformer import Transformer, TransformerConfig

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480,000 samples per window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3,000 mel frames per window
# Uni-MoE's data code cuts a long clip into pieces of 480,001 samples (``sample[:480001]``) and Whisper's feature
# extractor then trims each piece to 480,000: one sample in 480,001 is dropped and the chunk COUNT follows 480,001.
# We keep that stride so a clip gives the same windows (and the same number of audio tokens) as the official model.
UNI_MOE_CHUNK_STRIDE = N_SAMPLES + 1
MEL_BIN_OPTIONS = (80, 128)


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    # Slaney's Auditory Toolbox scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above.
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log_step = math.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / log_step, mel)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    log_step = math.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(log_step * (m - 15.0)), 200.0 * m / 3.0)


def mel_filterbank(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                   f_min: float = 0.0, f_max: Optional[float] = None) -> Tensor:
    """Slaney-scale, Slaney-normalised triangular filters ``[n_mels, n_fft // 2 + 1]`` (float32; computed in
    float64 so the edges match librosa's to rounding)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(f_min), _hz_to_mel_slaney(f_max), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_freqs[None] - lower) / (centre - lower)
    falling = (upper - fft_freqs[None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= 2.0 / (upper - lower)  # equal area per filter, so wide high-frequency filters do not dominate
    return torch.from_numpy(weights).to(torch.float32)


def check_sample_rate(sample_rate: int, front_end: str) -> None:
    """A ValueError unless ``sample_rate`` is the 16 kHz every audio front end of the zoo takes."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"audio has sample rate {sample_rate} Hz but {front_end} needs {SAMPLE_RATE} Hz; "
                         f"resample first, e.g. torchaudio.functional.resample(audio, {sample_rate}, {SAMPLE_RATE}) "
                         f"or scipy.signal.resample_poly(audio, {SAMPLE_RATE}, {sample_rate})")


def check_samples(audio: Tensor) -> Tensor:
    """``audio`` as float32, or a ValueError for integer PCM or non-finite samples (every audio front end)."""
    if not audio.is_floating_point():
        raise ValueError(f"audio must be float samples in [-1, 1], got dtype {audio.dtype}; integer PCM must be "
                         "scaled first (e.g. int16 / 32768)")
    if not torch.isfinite(audio).all():
        raise ValueError("audio holds NaN or infinite samples")
    return audio.to(torch.float32)


def check_audio(audio: Union[Tensor, np.ndarray], sample_rate: int) -> Tensor:
    """A 1-D float32 tensor of 16 kHz samples, or a ValueError saying what is wrong and how to fix it."""
    check_sample_rate(sample_rate, "the Whisper front end")
    audio = torch.as_tensor(audio)
    if audio.dim() == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)  # [1, T] / [T, 1]: one channel
    if audio.dim() != 1:
        raise ValueError(f"audio must be mono, shape [samples], got shape {tuple(audio.shape)}; average the "
                         "channels (audio.mean(channel_dim)) first")
    if audio.numel() == 0:
        raise ValueError("audio clip is empty (0 samples); there is nothing to encode")
    return check_samples(audio)


def split_windows(audio: Tensor, stride: Optional[int] = None, window: int = N_SAMPLES) -> Tensor:
    """``[T]`` -> ``[N, window]`` windows in order (Whisper's 30 s = 480,000 samples by default): a clip of up to one
    window gives one window, a longer clip one window per started ``stride`` samples (default ``window + 1``:
    Uni-MoE's 480,001 for 30 s windows, see ``UNI_MOE_CHUNK_STRIDE``), each trimmed to ``window`` samples and the
    last one zero-padded."""
    if window < 1:
        raise ValueError(f"window must be a positive number of samples, got {window}")
    stride = window + 1 if stride is None else stride
    starts = range(0, audio.shape[0], stride) if audio.shape[0] > window else [0]
    windows = [audio[s:s + window] for s in starts]
    return torch.stack([F.pad(w, (0, window - w.shape[0])) for w in windows])


def window_samples(seconds: float) -> int:
    """A log-mel window of ``seconds`` as a sample count the Whisper front end and encoder take: a positive whole
    number of encoder positions (2 hops = 320 samples = 20 ms each); ValueError otherwise."""
    samples = round(seconds * SAMPLE_RATE)
    if seconds <= 0 or abs(samples - seconds * SAMPLE_RATE) > 1e-6 or samples % (2 * HOP_LENGTH):
        raise ValueError(f"an audio window of {seconds} s is not a whole number of 20 ms encoder positions "
                         f"(Whisper: 30 s = 1500 positions); use a multiple of 0.02 s")
    return samples


def log_mel_spectrogram(windows: Tensor, n_mels: int = 80) -> Tensor:
    """``[N, samples]`` windows (480,000 = Whisper's 30 s; any multiple of the 160-sample hop) -> ``[N, n_mels,
    samples / 160]`` Whisper log-mel features (float32; 3000 frames for 30 s)."""
    if n_mels not in MEL_BIN_OPTIONS:
        raise ValueError(f"n_mels={n_mels}; the Whisper front end computes {MEL_BIN_OPTIONS} mel bins (128 for "
                         "large-v3); for an encoder with another count pass log-mel features [B, C, n_mels, frames]")
    if windows.dim() != 2 or windows.shape[-1] < HOP_LENGTH or windows.shape[-1] % HOP_LENGTH:
        raise ValueError(f"expected windows of shape [N, samples] with samples a multiple of {HOP_LENGTH} "
                         f"({N_SAMPLES} for Whisper's 30 s), got {tuple(windows.shape)}; use split_windows first")
    window = torch.hann_window(N_FFT, periodic=True, device=windows.device, dtype=windows.dtype)
    stft = torch.stft(windows, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect",
                      return_complex=True)
    power = stft[..., :-1].abs() ** 2  # Whisper drops the last (half-outside) frame: 3001 -> 3000
    mel = mel_filterbank(n_mels).to(windows.device) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    # Dynamic range: at most 80 dB (8 in log10 units) below the loudest bin of the same window.
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


def audio_features(audio: Union[Tensor, np.ndarray], sample_rate: int, n_mels: int = 80) -> Tensor:
    """One clip (``[T]`` float samples at 16 kHz) -> ``[N, n_mels, 3000]``, one row per 30 s window in order."""
    return log_mel_spectrogram(split_windows(check_audio(audio, sample_rate)), n_mels)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """``[length, channels]``: sin in the first half of the channels, cos in the second, timescales geometric from
    1 to ``max_timescale`` (Whisper's encoder position table)."""
    if channels % 2:
        raise ValueError(f"sinusoidal position embedding needs an even width, got {channels}")
    step = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-step * torch.arange(channels // 2, dtype=torch.float64))
    t = torch.arange(length, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([t.sin(), t.cos()], dim=1).to(torch.float32)


@dataclass
class WhisperEncoderConfig:
    """Whisper audio encoder shape: ``n_mels`` input bins (80 or 128 in released models; any positive count, e.g. a
    tiny converted test tower's 8), width ``dim``, ``depth`` blocks, ``num_heads``,
    MLP hidden ``mlp_dim``, ``max_positions`` output frames (1500 = 3000 mel frames / 2).

    Presets (:meth:`preset`): ``tiny`` (a test size), ``whisper-tiny``, ``whisper-base``, ``whisper-small``,
    ``whisper-medium``, ``whisper-large`` (v2), ``whisper-large-v3`` (128 mel bins)."""

    n_mels: int = 80
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 1500
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        # Released Whisper models take 80 or 128 bins (the only counts the front end computes); a converted tiny
        # test tower may take fewer, so any positive count is a valid encoder shape.
        if isinstance(self.n_mels, bool) or not isinstance(self.n_mels, int) or self.n_mels < 1:
            raise ValueError(f"n_mels={self.n_mels!r} must be a positive integer number of mel bins (released "
                             f"Whisper models use {MEL_BIN_OPTIONS})")
        for name in ("dim", "depth", "num_heads", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {self.max_positions}")

    @classmethod
    def preset(cls, name: str) -> "WhisperEncoderConfig":
        if name not in WHISPER_SHAPES:
            raise ValueError(f"unknown Whisper shape {name!r}; known: {', '.join(WHISPER_SHAPES)}")
        return cls(**WHISPER_SHAPES[name])

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(dim=self.dim, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                                 activation="gelu", qkv_bias=True, mlp_bias=True, norm_eps=self.norm_eps)


# (dim, depth, heads) of OpenAI's released checkpoints; the MLP is 4x wide in all of them.
WHISPER_SHAPES: dict[str, dict] = {
    "tiny": dict(dim=64, depth=2, num_heads=4, mlp_dim=256),
    "whisper-tiny": dict(dim=384, depth=4, num_heads=6, mlp_dim=1536),
    "whisper-base": dict(dim=512, depth=6, num_heads=8, mlp_dim=2048),
    "whisper-small": dict(dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "whisper-medium": dict(dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    "whisper-large": dict(dim=1280, depth=32, num_heads=20, mlp_dim=5120),
    "whisper-large-v3": dict(n_mels=128, dim=1280, depth=32, num_heads=20, mlp_dim=5120),
}


class WhisperEncoder(nn.Module):
    """``forward(features [B, n_mels, T]) -> [B, T // 2, D]`` with ``T <= 2 * max_positions`` and T even (3000 for
    real Whisper features); ``mask`` [B, T // 2] (True = real frame) optionally keeps padded frames out of attention
    (Whisper itself always attends to the whole padded window, so leave it None to match released models).

    Parameters: ``conv1``, ``conv2``, ``pos_embed`` (buffer ``[max_positions, D]``, sinusoids; a converter may
    overwrite it with the checkpoint's table), ``transformer`` (blocks + final ``norm``)."""

    def __init__(self, config: WhisperEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv1d(config.n_mels, config.dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.dim, config.dim, kernel_size=3, stride=2, padding=1)
        self.register_buffer("pos_embed", sinusoids(config.max_positions, config.dim))
        self.transformer = Transformer(config.transformer_config())

    def forward(self, features: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        n_mels, max_frames = self.config.n_mels, 2 * self.config.max_positions
        if features.dim() != 3:
            raise ValueError(f"expected log-mel features [B, n_mels, frames], got shape {tuple(features.shape)}")
        if features.shape[1] != n_mels:
            raise ValueError(f"features have {features.shape[1]} mel bins but this encoder takes {n_mels}; compute "
                             f"them with audio_features(..., n_mels={n_mels})")
        if features.shape[2] > max_frames or features.shape[2] % 2:
            raise ValueError(f"features have {features.shape[2]} frames; the encoder takes an even count up to "
                             f"{max_frames} (one window of {max_frames // 100} s)")
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [B, T/2, D]
        x = x + self.pos_embed[: x.shape[1]].to(x.dtype)
        return self.transformer(x, mask)
