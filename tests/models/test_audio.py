"""Whisper front end (zoo/models/audio.py): log-mel features against an independent numpy reference and against
transformers' WhisperFeatureExtractor (test-only dependency) on a real FSDD recording; 30 s windowing as Uni-MoE's
data code; input errors; encoder shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import shared_dataset_dir
from zoo.models.audio import (N_FRAMES, N_SAMPLES, SAMPLE_RATE, UNI_MOE_CHUNK_STRIDE, WhisperEncoder,
                              WhisperEncoderConfig, audio_features, mel_filterbank)


def numpy_log_mel(audio: np.ndarray, n_mels: int = 80, window: int = N_SAMPLES) -> np.ndarray:
    """Written from the published recipe with numpy only (framing by hand, rfft, librosa's Slaney formulas)."""
    x = np.zeros(window, dtype=np.float64)
    x[: min(len(audio), window)] = audio[:window]
    n_fft, hop = 400, 160
    padded = np.pad(x, n_fft // 2, mode="reflect")
    n_frames = 1 + (len(padded) - n_fft) // hop
    frames = np.stack([padded[i * hop: i * hop + n_fft] for i in range(n_frames)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # [frames, 201]
    power = power[:-1].T  # drop the last frame -> [201, 3000]

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f < 1000, f / (200 / 3), 15 + np.log(np.maximum(f, 1e-10) / 1000) * 27 / np.log(6.4))

    def mel_to_hz(m):
        return np.where(m < 15, m * 200 / 3, 1000 * np.exp((m - 15) * np.log(6.4) / 27))

    hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(8000.0), n_mels + 2))
    freqs = np.arange(n_fft // 2 + 1) * SAMPLE_RATE / n_fft
    fb = np.zeros((n_mels, len(freqs)))
    for m in range(n_mels):
        up = (freqs - hz[m]) / (hz[m + 1] - hz[m])
        down = (hz[m + 2] - freqs) / (hz[m + 2] - hz[m + 1])
        fb[m] = np.maximum(0, np.minimum(up, down)) * 2 / (hz[m + 2] - hz[m])
    log_spec = np.log10(np.maximum(fb @ power, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def fsdd_clip_16k() -> np.ndarray:
    """A real spoken digit (8 kHz int16 wav), resampled to 16 kHz float32 in [-1, 1]."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    folder = shared_dataset_dir("fsdd", "recordings/3_jackson_7.wav")
    rate, pcm = wavfile.read(folder / "recordings" / "3_jackson_7.wav")
    assert rate == 8000 and pcm.dtype == np.int16
    return resample_poly(pcm.astype(np.float64) / 32768.0, SAMPLE_RATE, rate).astype(np.float32)


def test_mel_filterbank_matches_numpy_reference_shape_and_area():
    fb = mel_filterbank(80).numpy()
    assert fb.shape == (80, 201) and (fb >= 0).all()
    # Slaney normalisation: filter m integrates (over Hz, triangle area) to 1: sum(w) * bin width ~= 1 for wide ones.
    assert np.allclose(fb[-10:].sum(1) * (SAMPLE_RATE / 400), 1.0, rtol=0.05)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_numpy_reference(n_mels):
    rng = np.random.default_rng(0)
    t = np.arange(int(2.5 * SAMPLE_RATE)) / SAMPLE_RATE
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
    ours = audio_features(torch.from_numpy(audio), SAMPLE_RATE, n_mels=n_mels)
    assert ours.shape == (1, n_mels, N_FRAMES)
    np.testing.assert_allclose(ours[0].numpy(), numpy_log_mel(audio, n_mels), atol=2e-4)


def test_log_mel_matches_transformers_on_real_speech():
    transformers = pytest.importorskip("transformers")
    audio = fsdd_clip_16k()
    ref = transformers.WhisperFeatureExtractor(feature_size=80)(
        audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    ours = audio_features(torch.from_numpy(audio), SAMPLE_RATE).numpy()
    assert ours.shape == ref.shape == (1, 80, N_FRAMES)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    np.testing.assert_allclose(ours[0], numpy_log_mel(audio), atol=2e-4)


def test_long_clip_is_split_into_30s_windows_in_order():
    # 70 s: Uni-MoE cuts pieces of 480,001 samples, each trimmed to 480,000 -> 3 windows.
    rng = np.random.default_rng(1)
    audio = (0.1 * rng.standard_normal(70 * SAMPLE_RATE)).astype(np.float32)
    feats = audio_features(torch.from_numpy(audio), SAMPLE_RATE)
    assert feats.shape == (3, 80, N_FRAMES)
    for i in range(3):
        piece = audio[i * UNI_MOE_CHUNK_STRIDE: i * UNI_MOE_CHUNK_STRIDE + N_SAMPLES]
        np.testing.assert_allclose(feats[i].numpy(), numpy_log_mel(piece), atol=2e-4)
    # Exactly 30 s is one window; one sample more is still one window (the official 480,001-sample piece).
    assert audio_features(torch.zeros(N_SAMPLES) + 0.01, SAMPLE_RATE).shape[0] == 1
    assert audio_features(torch.zeros(N_SAMPLES + 1) + 0.01, SAMPLE_RATE).shape[0] == 1
    assert audio_features(torch.zeros(N_SAMPLES + 2) + 0.01, SAMPLE_RATE).shape[0] == 2


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"8000 Hz.*16000 Hz.*resample"):
        audio_features(torch.zeros(8000), 8000)
    with pytest.raises(ValueError, match="empty"):
        audio_features(torch.zeros(0), SAMPLE_RATE)
    with pytest.raises(ValueError, match="mono"):
        audio_features(torch.zeros(2, 100), SAMPLE_RATE)
    with pytest.raises(ValueError, match="int16 / 32768"):
        audio_features(torch.zeros(100, dtype=torch.int16), SAMPLE_RATE)
    with pytest.raises(ValueError, match="mel bins"):
        audio_features(torch.zeros(100), SAMPLE_RATE, n_mels=64)
    enc = WhisperEncoder(WhisperEncoderConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"128 mel bins but this encoder takes 80"):
        enc(torch.zeros(1, 128, N_FRAMES))
    with pytest.raises(ValueError, match="frames"):
        enc(torch.zeros(1, 80, N_FRAMES + 2))
    with pytest.raises(ValueError, match="unknown Whisper shape"):
        WhisperEncoderConfig.preset("whisper-huge")


def test_encoder_shapes_and_presets():
    enc = WhisperEncoder(WhisperEncoderConfig.preset("tiny")).eval()
    feats = audio_features(torch.randn(SAMPLE_RATE) * 0.1, SAMPLE_RATE)
    assert enc(feats).shape == (1, 1500, 64)
    assert enc(feats[..., :200]).shape == (1, 100, 64)  # shorter inputs use the first rows of the table
    assert WhisperEncoderConfig.preset("whisper-small").dim == 768
    assert WhisperEncoderConfig.preset("whisper-large-v3").n_mels == 128


def test_encoder_config_takes_any_positive_mel_count():
    """Converted tiny towers (e.g. the Uni-MoE fixture's 8-bin Whisper) build; nonsense counts are refused."""
    enc = WhisperEncoder(WhisperEncoderConfig(n_mels=8, dim=16, depth=1, num_heads=2, mlp_dim=32, max_positions=8))
    assert enc(torch.zeros(1, 8, 16)).shape == (1, 8, 16)
    for bad in (0, -80, 2.5, True):
        with pytest.raises(ValueError, match="positive integer number of mel bins"):
            WhisperEncoderConfig(n_mels=bad)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        WhisperEncoderConfig(dim=10, num_heads=4)
    with pytest.raises(ValueError, match="pass log-mel features"):
        audio_features(torch.zeros(100), SAMPLE_RATE, n_mels=8)


def test_short_windows_match_the_numpy_reference_and_split_long_clips():
    """audio_window_seconds < 30 (tiny encoders trained from scratch): the same front end on a shorter window."""
    from zoo.models.audio import log_mel_spectrogram, split_windows, window_samples

    window = window_samples(2.5)
    assert window == 40_000
    clip = fsdd_clip_16k()
    got = log_mel_spectrogram(split_windows(torch.from_numpy(clip).float(), window=window))
    assert got.shape == (1, 80, 250)
    np.testing.assert_allclose(got[0].numpy(), numpy_log_mel(clip, window=window), atol=2e-4)
    long = torch.arange(2 * window + 5, dtype=torch.float32)
    windows = split_windows(long, window=window)  # stride window + 1, as the 30 s rule: 3 windows, in order
    assert windows.shape == (3, window)
    assert windows[1, 0] == window + 1 and windows[2, 0] == 2 * window + 2 and windows[2, 3:].abs().sum() == 0
    for bad in (0.0, -1.0, 0.015, 2.501):
        with pytest.raises(ValueError, match="0.02 s"):
            window_samples(bad)
