"""Moving-digit video clips made from MNIST digits (deterministic from a seed).

A clip is ``frames`` frames of a ``canvas x canvas`` black canvas on which one 28x28 MNIST digit moves in a straight
line, at constant speed, from one edge to the opposite one: ``"right"`` starts at the left edge and ends touching
the right edge, ``"left"`` the reverse, ``"down"`` / ``"up"`` likewise vertically. The coordinate across the motion
is drawn once per clip from ``seed`` (uniform over the positions that keep the digit inside the canvas), so a clip
is a pure function of ``(digit image, direction, frames, canvas, seed)``; clips are rendered when read, never
stored.

Clips are uint8 ``[T, 1, canvas, canvas]`` (grayscale, as MNIST); the instruction datamodule turns each frame into
a tower image (``[T, 3, S, S]``, normalised) and batches them as ``"video" [B, T, 3, S, S]`` with the ``<video>``
placeholder (-400, the Uni-MoE 8-expert code's id): the model runs the frames through the image tower (the official
Uni-MoE mean-pools the frame features into one image's tokens).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")


def check_clip_geometry(frames: int, canvas: int, digit_size: int = 28) -> None:
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"a clip needs frames >= 2 (an integer) to show motion, got {frames!r}")
    if isinstance(canvas, bool) or not isinstance(canvas, int) or canvas < digit_size + frames - 1:
        raise ValueError(f"canvas={canvas!r} must be an integer >= digit size {digit_size} + frames - 1 = "
                         f"{digit_size + frames - 1}, so the digit moves at least one pixel per frame")


def moving_digit_clip(digit: torch.Tensor, direction: str, frames: int = 8, canvas: int = 64,
                      seed: int = 0) -> torch.Tensor:
    """``digit`` uint8 ``[1, h, w]`` (or ``[h, w]``) moving ``direction`` -> uint8 ``[frames, 1, canvas, canvas]``."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    image = digit if digit.ndim == 3 else digit[None]
    if image.ndim != 3 or image.shape[0] != 1:
        raise ValueError(f"digit must be a grayscale [1, h, w] or [h, w] image, got shape {tuple(digit.shape)}")
    h, w = image.shape[1:]
    positions = clip_positions(h, w, direction, frames, canvas, seed)
    clip = torch.zeros(frames, 1, canvas, canvas, dtype=torch.uint8)
    for t, (top, left) in enumerate(positions):
        clip[t, :, top:top + h, left:left + w] = image
    return clip


def clip_positions(h: int, w: int, direction: str, frames: int = 8, canvas: int = 64,
                   seed: int = 0) -> list[tuple[int, int]]:
    """The ``(top, left)`` corner of an ``h x w`` digit in each frame of its clip (the layout of
    :func:`moving_digit_clip`)."""
    check_clip_geometry(frames, canvas, max(h, w))
    rng = np.random.default_rng(seed)
    horizontal = direction in ("left", "right")
    across = int(rng.integers(0, (canvas - h if horizontal else canvas - w) + 1))
    along = _along((canvas - w) if horizontal else (canvas - h), frames, direction in ("left", "up"))
    return [(across, a) if horizontal else (a, across) for a in along]


@functools.lru_cache(maxsize=256)
def _along(span: int, frames: int, backwards: bool) -> tuple[int, ...]:
    """The coordinate along the motion per frame: start edge -> opposite edge (reversed when ``backwards``)."""
    along = np.round(np.linspace(0, span, frames)).astype(int)
    return tuple((along[::-1] if backwards else along).tolist())


@dataclass(frozen=True, eq=False)
class MovingDigitClip:
    """A clip to render on demand: ``clip()`` -> uint8 ``[frames, 1, canvas, canvas]`` (see the module docstring).
    ``digits`` is the MNIST image tensor ``[N, 1, 28, 28]`` (shared, not copied) and ``row`` the digit's row."""

    digits: torch.Tensor
    row: int
    direction: str
    frames: int = 8
    canvas: int = 64
    seed: int = 0

    def __call__(self) -> torch.Tensor:
        return moving_digit_clip(self.digits[self.row], self.direction, self.frames, self.canvas, self.seed)

    def normalised(self, processor: Any) -> Optional[torch.Tensor]:
        """The clip as ``processor`` (an :class:`~zoo.data.instruct.ImageProcessor`) turns it into tower frames,
        float32 ``[frames, 3, canvas, canvas]``, without rendering it: the black canvas is the normalised value of
        0 and the digit is normalised once and pasted per frame, so the values are bit-identical to processing
        ``clip()`` frame by frame. None when that shortcut does not apply (frames not at the processor's size, or
        a digit that is not uint8): the caller then processes ``clip()``."""
        digit = self.digits[self.row]
        digit = digit if digit.ndim == 3 else digit[None]
        if (getattr(processor, "size", None) != self.canvas or digit.dtype != torch.uint8 or digit.ndim != 3
                or digit.shape[0] != 1 or not hasattr(processor, "normalise_uint8")):
            return None
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        h, w = digit.shape[1:]
        positions = clip_positions(h, w, self.direction, self.frames, self.canvas, self.seed)
        sprite = processor.normalise_uint8(digit).numpy()  # [3, h, w]
        out = np.empty((self.frames, 3, self.canvas, self.canvas), dtype=np.float32)
        out[:] = processor.lut[:, 0].numpy().reshape(1, 3, 1, 1)  # the black canvas
        for t, (top, left) in enumerate(positions):  # numpy slicing: ~1 us a paste (torch: ~8)
            out[t, :, top:top + h, left:left + w] = sprite
        out = torch.from_numpy(out)
        return out
