"""Audio for the instruction sets: wav reading (stdlib ``wave``), resampling in torch, and the Free Spoken Digit
Dataset (FSDD) with its official split.

- :func:`read_wav`: 8/16/24/32-bit PCM wav -> ``(float32 [channels, samples] in [-1, 1], sample rate)`` with the
  stdlib ``wave`` module (``soundfile`` is used instead when it is installed; both give the same floats for PCM).
- :func:`resample`: band-limited (windowed-sinc) resampling by a rational ratio, in torch. Method: for output
  sample times ``t`` (in input samples) the kernel is ``sinc(f_c (t - k)) * w(t - k) * f_c`` over input samples
  ``k`` within ``width`` zero crossings, with cutoff ``f_c = rolloff * min(1, new/orig)`` (in cycles per input
  sample, times 2) and a Hann window ``w(x) = cos^2(pi x f_c / (2 width))`` over ``|x f_c| <= width``; it is
  computed as a strided conv1d with one kernel per output phase. Defaults ``width=6``, ``rolloff=0.99`` (those of
  torchaudio's ``sinc_interp_hann``). The official Uni-MoE code uses ``librosa.resample`` (soxr): a different
  filter, so the waveforms differ slightly; both keep the band below ~3.96 kHz of an 8 kHz file intact.
- :class:`FSDDRecording` / :func:`fsdd_recordings` / :func:`fsdd_split`: ``recordings/{digit}_{speaker}_{index}.wav``
  (6 speakers x 10 digits x 50 indices, 8 kHz mono 16-bit); the official split puts indices 0-4 in test (300) and
  5-49 in train (2700); :func:`fsdd_split` can carve a validation split by index too.
"""

from __future__ import annotations

import functools
import math
import os
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zoo.data.paths import find_dataset_dir, incomplete_dataset_error

PathLike = str | os.PathLike[str]
TARGET_SAMPLE_RATE = 16000  # Whisper's rate; the audio towers compute log-mel features at 16 kHz


def read_wav(path: PathLike) -> tuple[torch.Tensor, int]:
    """``(float32 [channels, samples] in [-1, 1], sample_rate)`` of a PCM wav file.

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for one that is not a PCM wav.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        import soundfile  # optional: reads more formats

        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        return torch.from_numpy(np.ascontiguousarray(data.T)), int(rate)
    except ImportError:
        pass
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(frames)
    except (wave.Error, EOFError) as err:
        raise ValueError(f"cannot read {path} as a PCM wav file: {err}") from err
    if width == 1:  # 8-bit wav is unsigned
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        dtype = np.int16 if width == 2 else np.int32
        data = np.frombuffer(raw, dtype=f"<{np.dtype(dtype).str[1:]}").astype(np.float32) / float(2 ** (8 * width - 1))
    elif width == 3:  # little-endian 24-bit: widen to int32 by putting the 3 bytes in the top of each word
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        data = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float32) / float(2 ** 23)
    else:
        raise ValueError(f"{path}: unsupported sample width {width} bytes (PCM 8/16/24/32-bit expected)")
    if data.size != frames * channels:
        raise ValueError(f"{path}: truncated wav ({data.size} samples, header says {frames * channels})")
    return torch.from_numpy(data.reshape(frames, channels).T.copy()), int(rate)


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int, width: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling of ``waveform [..., samples]`` from ``orig_rate`` to ``new_rate`` (Hz, integers) ->
    ``[..., ceil(samples * new_rate / orig_rate)]`` (see the module docstring for the filter)."""
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return waveform
    g = math.gcd(int(orig_rate), int(new_rate))
    up, down = int(new_rate) // g, int(orig_rate) // g  # per block: `down` input samples -> `up` output samples
    dtype = waveform.dtype if waveform.is_floating_point() else torch.float32
    shape = waveform.shape
    x = waveform.reshape(-1, 1, shape[-1]).to(dtype)
    cutoff = rolloff * min(up, down)  # in cycles per block, times 2: the filter's band edge
    half = int(math.ceil(width * down / cutoff))  # kernel half-length in input samples
    # Kernel taps at input offsets k = -half .. half + down - 1 (relative to the block start); phase j's output
    # sample sits at j / up input samples... measured in blocks of `down` input samples: time (k / down - j / up).
    offsets = torch.arange(-half, half + down, dtype=torch.float64) / down
    times = offsets[None, :] - torch.arange(up, dtype=torch.float64)[:, None] / up  # [up, K]
    scaled = (times * cutoff).clamp(-width, width)
    window = torch.cos(scaled * math.pi / (2 * width)) ** 2
    kernel = torch.where(scaled == 0, torch.ones_like(scaled), torch.sin(math.pi * scaled) / (math.pi * scaled))
    kernel = (kernel * window * cutoff / down).to(dtype)  # gain 1 at DC per output sample
    padded = torch.nn.functional.pad(x, (half, half + down))
    out = torch.nn.functional.conv1d(padded, kernel[:, None, :], stride=down)  # [N, up, blocks]
    out = out.transpose(1, 2).reshape(x.shape[0], -1)
    length = int(math.ceil(up * shape[-1] / down))
    return out[:, :length].reshape(*shape[:-1], length)


def load_audio(path: PathLike, sample_rate: int = TARGET_SAMPLE_RATE) -> torch.Tensor:
    """A wav file as mono float32 ``[samples]`` at ``sample_rate`` (channels averaged, resampled).

    Decoded clips are kept per process (keyed by path, size and modification time; up to 4,096 clips, FSDD's 3,000
    recordings at 16 kHz are ~90 MB): resampling every clip again each epoch was most of a speech batch's loading
    time. Each call returns its own copy."""
    stat = os.stat(path)
    return _load_audio_cached(str(path), stat.st_size, stat.st_mtime_ns, int(sample_rate)).clone()


@functools.lru_cache(maxsize=4096)
def _load_audio_cached(path: str, size: int, mtime_ns: int, sample_rate: int) -> torch.Tensor:
    waveform, rate = read_wav(path)
    if waveform.shape[-1] == 0:
        raise ValueError(f"{path} holds no samples (an empty clip)")
    return resample(waveform.mean(0), rate, sample_rate)


# ------------------------------------------------------------------------------------------------- FSDD
FSDD_FOLDER = "fsdd"
FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
FSDD_TEST_INDICES = range(0, 5)  # the official rule (FSDD README): recordings 0-4 of each speaker/digit are test


@dataclass(frozen=True)
class FSDDRecording:
    """One FSDD file: ``path``, ``digit`` (0-9), ``speaker``, ``index`` (0-49)."""

    path: Path
    digit: int
    speaker: str
    index: int


def fsdd_folder(data_dir: PathLike | None = None) -> Path:
    """``<data root>/fsdd`` (holding ``recordings/``); FileNotFoundError saying where it looked."""
    folder = find_dataset_dir(FSDD_FOLDER, data_dir, marker_files=["recordings"])
    if not (folder / "recordings").is_dir():
        raise incomplete_dataset_error("FSDD", folder, ["recordings/"], "recordings/{digit}_{speaker}_{index}.wav")
    return folder


def fsdd_recordings(data_dir: PathLike | None = None) -> list[FSDDRecording]:
    """Every FSDD recording, sorted by (digit, speaker, index). Files not named ``{digit}_{speaker}_{index}.wav``
    are an error (a stray file would otherwise be silently skipped)."""
    folder = fsdd_folder(data_dir) / "recordings"
    out, bad = [], []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() != ".wav":
            continue
        m = FSDD_NAME.match(p.name)
        if m is None:
            bad.append(p.name)
            continue
        out.append(FSDDRecording(p, int(m.group(1)), m.group(2), int(m.group(3))))
    if bad:
        raise ValueError(f"{folder}: {len(bad)} wav file(s) not named {{digit}}_{{speaker}}_{{index}}.wav: {bad[:5]}")
    if not out:
        raise incomplete_dataset_error("FSDD", folder, ["*.wav"], "recordings/{digit}_{speaker}_{index}.wav")
    return sorted(out, key=lambda r: (r.digit, r.speaker, r.index))


def fsdd_split(recordings: list[FSDDRecording], val_indices: int = 5) -> dict[str, list[FSDDRecording]]:
    """The official split (index 0-4 test, the rest train), with validation carved by index as well: indices
    5 .. 4 + ``val_indices`` go to val (default 5-9: 300 recordings, every speaker and digit); 0 = no val split
    (val is then the test split, for monitoring only)."""
    if not 0 <= val_indices <= 44:
        raise ValueError(f"val_indices must be in 0..44 (recording indices after the test ones), got {val_indices}")
    test = [r for r in recordings if r.index in FSDD_TEST_INDICES]
    val_range = range(5, 5 + val_indices)
    val = [r for r in recordings if r.index in val_range] if val_indices else test
    train = [r for r in recordings if r.index not in FSDD_TEST_INDICES and r.index not in val_range]
    return {"train": train, "val": val, "test": test}
