"""Augmentations of one ``[C, H, W]`` image tensor for the image-text data (random resized crop + flip, colour
jitter + grayscale, chaining) and CLIP's normalisation constants. They draw from torch's global CPU generator,
which the training loader seeds per sample (:mod:`zoo.data.sampling`)."""

from __future__ import annotations

import numpy as np
import torch

# CLIP's image normalisation (used for photos: Flickr8k, user CSVs).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def random_resized_crop_flip(scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
    """Augmentation for one ``[C, H, W]`` image (any dtype, output same dtype and size): crop a random area
    fraction in ``scale`` with aspect ratio in ``ratio`` (log-uniform), resize it back bilinearly, flip
    horizontally with probability 1/2 (torch's global RNG, seeded by Lightning / the loader workers)."""
    lo, hi = float(scale[0]), float(scale[1])
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
    log_r = (np.log(ratio[0]), np.log(ratio[1]))

    def augment(image: torch.Tensor) -> torch.Tensor:
        _, h, w = image.shape
        area = h * w * (lo + (hi - lo) * float(torch.rand(())))
        r = float(np.exp(log_r[0] + (log_r[1] - log_r[0]) * float(torch.rand(()))))
        ch = int(round(min(h, max(1.0, (area / r) ** 0.5))))
        cw = int(round(min(w, max(1.0, (area * r) ** 0.5))))
        top = int(torch.randint(h - ch + 1, ()))
        left = int(torch.randint(w - cw + 1, ()))
        crop = image[:, top:top + ch, left:left + cw].float().unsqueeze(0)
        out = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
        if torch.rand(()) < 0.5:
            out = out.flip(-1)
        return out.round().clamp(0, 255).to(image.dtype) if not image.is_floating_point() else out.to(image.dtype)

    return augment


def _gray(image: torch.Tensor) -> torch.Tensor:
    """[C, H, W] float -> [1, H, W] luma (ITU-R 601-2 weights for RGB, the channel mean otherwise)."""
    if image.shape[0] == 3:
        return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).unsqueeze(0)
    return image.mean(0, keepdim=True)


def color_jitter_grayscale(strength: float = 1.0, p_jitter: float = 0.8, p_gray: float = 0.2,
                           pixel_max: float = 255.0):
    """SimCLR's colour distortion (Chen et al. 2020) for one ``[C, H, W]`` image with pixels in ``[0, pixel_max]``
    (any dtype, output same dtype and size): with probability ``p_jitter`` jitter brightness, contrast and
    saturation (in a random order) by factors drawn uniformly from ``[max(0, 1 - 0.8 s), 1 + 0.8 s]``
    (torchvision's ``ColorJitter(0.8 s, 0.8 s, 0.8 s)`` blends, clamped after each), then with probability
    ``p_gray`` convert to grayscale. SimCLR's hue jitter (0.2 s) is left out. torch's global RNG, like
    :func:`random_resized_crop_flip`."""
    s = float(strength)
    if s < 0 or not 0 <= p_jitter <= 1 or not 0 <= p_gray <= 1:
        raise ValueError(f"need strength >= 0 and probabilities in [0, 1], got {strength}, {p_jitter}, {p_gray}")
    lo, hi = max(0.0, 1.0 - 0.8 * s), 1.0 + 0.8 * s

    def augment(image: torch.Tensor) -> torch.Tensor:
        x = image.float()
        if float(torch.rand(())) < p_jitter:
            factors = lo + (hi - lo) * torch.rand(3)
            for op in torch.randperm(3).tolist():
                f = float(factors[op])
                if op == 0:  # brightness: blend with black
                    x = x * f
                elif op == 1:  # contrast: blend with the mean grey level
                    x = f * x + (1 - f) * _gray(x).mean()
                else:  # saturation: blend with the grayscale image
                    x = f * x + (1 - f) * _gray(x)
                x = x.clamp(0, pixel_max)
        if float(torch.rand(())) < p_gray:
            x = _gray(x).expand_as(x)
        return x.to(image.dtype) if image.is_floating_point() else x.round().clamp(0, pixel_max).to(image.dtype)

    return augment


def chain_augment(*steps):
    """One augmentation applying ``steps`` in order (None steps are skipped; None when none is left)."""
    steps = [f for f in steps if f is not None]
    if not steps:
        return None

    def augment(image: torch.Tensor) -> torch.Tensor:
        for f in steps:
            image = f(image)
        return image

    return augment
