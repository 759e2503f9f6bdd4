"""Input checks shared by every model family: a bad batch fails with what is wrong and how to fix it."""

from __future__ import annotations

import torch
from typing import Optional

from torch import Tensor


def check_token_ids(ids: Tensor, vocab_size: int, name: str = "token ids") -> None:
    """Integer ids in ``[0, vocab_size)``; the range is read back only on CPU (on an accelerator it would stall every
    step; an out-of-range id there fails in the embedding's device-side index check)."""
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"{name} must be integer token ids, got {ids.dtype}; tokenize the text (ids.long() if "
                         "they are ids stored as floats)")
    if ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{name}: token ids must be in [0, vocab_size={vocab_size}), got id {bad}; use the "
                             "model's tokenizer or a model with a larger vocab_size")


def validate_images(images: Tensor, in_chans: int, image_size: int,
                    dtype: Optional[torch.dtype] = None) -> None:
    """Raise a ValueError that says what is wrong with an image batch and how to fix it; ``dtype``: the model's
    weight dtype, which the images must have outside autocast."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, C, H, W], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}; "
                         "add a batch axis with images.unsqueeze(0) for a single image")
    _, C, H, W = images.shape
    if C != in_chans:
        raise ValueError(f"expected {in_chans} channel(s), got {C} (shape {tuple(images.shape)}); "
                         f"convert the images or create the model with in_chans={C}")
    if (H, W) != (image_size, image_size):
        raise ValueError(f"expected {image_size}x{image_size} images, got {H}x{W}; resize the input or create "
                         f"the model with image_size={H} (position embeddings are resized when loading weights)")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor, got {images.dtype}; normalise them first")
    if dtype is not None and images.dtype != dtype and not torch.is_autocast_enabled(images.device.type):
        raise ValueError(f"images are {images.dtype} but the model's weights are {dtype}; convert them with "
                         f"images.to({dtype}) or run under torch.autocast")
    finite_msg = "images contain NaN or Inf values; check the data pipeline / normalisation"
    if images.device.type == "cpu" and not torch.compiler.is_compiling():  # compiled: checked like on a GPU below
        if not torch.isfinite(images).all():
            raise ValueError(finite_msg)
    elif torch.compiler.is_compiling() or not (images.is_cuda and torch.cuda.is_current_stream_capturing()):
        # On an accelerator, reading the answer back would make the host wait for the GPU at every forward (the
        # eager training step is launch-bound, so that wait is not free). The check runs on the device instead:
        # a NaN / Inf input stops the run with a device-side assert at the next synchronisation. Skipped while a
        # CUDA graph is captured (the graph replays whatever was checked eagerly).
        torch._assert_async(torch.isfinite(images).all(), finite_msg)
