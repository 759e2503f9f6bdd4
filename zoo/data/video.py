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

from dataclasses import dataclass

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
    check_clip_geometry(frames, canvas, max(h, w))
    rng = np.random.default_rng(seed)
    horizontal = direction in ("left", "right")
    across = int(rng.integers(0, (canvas - h if horizontal else canvas - w) + 1))
    span = (canvas - w) if horizontal else (canvas - h)
    along = np.round(np.linspace(0, span, frames)).astype(int)  # start edge -> opposite edge
    if direction in ("left", "up"):
        along = along[::-1]
    clip = torch.zeros(frames, 1, canvas, canvas, dtype=torch.uint8)
    for t, a in enumerate(along.tolist()):
        top, left = (across, a) if horizontal else (a, across)
        clip[t, :, top:top + h, left:left + w] = image
    return clip


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
