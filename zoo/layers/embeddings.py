"""Patch and position embeddings: the ViT front end every image family shares."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.layers.inputs import validate_images


def check_image_geometry(image_size: int, patch_size: int) -> None:
    """The image-family config checks of the input grid: positive sizes, the patch size dividing the image size."""
    for name, value in (("image_size", image_size), ("patch_size", patch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")


class PatchEmbed(nn.Module):
    """Image -> one token per ``patch x patch`` cell: [B, C, H, W] -> [B, (H/p)*(W/p), D].

    ``stem="patch"``: one linear projection of each non-overlapping patch (ViT).
    ``stem="conv"``: a convolutional stem (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"):
    log2(p) 3x3 stride-2 convolutions, each followed by BatchNorm + ReLU, widths doubling up to D (the first is
    ``D / 2**(log2(p) - 1)``), then a 1x1 convolution to D. Same token grid as ``"patch"``; overlapping receptive
    fields and early normalisation make small-data training better conditioned. Needs a power-of-2 patch size.
    ``bias=False`` drops the patch projection's bias (``stem="patch"`` only; OpenAI CLIP's towers have none).
    ``drop_remainder=True`` accepts an image size the patch size does not divide: like a "valid" convolution, the
    last ``image_size % patch_size`` rows and columns are not seen (SigLIP so400m: 384 px, patch 14 -> 27 x 27
    patches, 6 pixels unused); ``stem="patch"`` only.
    """

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int, stem: str = "patch",
                 bias: bool = True, drop_remainder: bool = False) -> None:
        super().__init__()
        if image_size % patch_size and not (drop_remainder and stem == "patch" and image_size >= patch_size):
            raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
        self.image_size, self.patch_size, self.in_chans = image_size, patch_size, in_chans
        self.grid = image_size // patch_size
        self.num_patches = self.grid**2
        if stem == "patch":
            self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size, bias=bias)
        elif stem == "conv":
            if not bias:
                raise ValueError("bias=False is only for stem='patch' (the conv stem's last 1x1 keeps its bias)")
            n = patch_size.bit_length() - 1
            if patch_size < 2 or 2**n != patch_size:
                raise ValueError(f"stem='conv' halves the resolution per 3x3 stride-2 convolution, so patch_size "
                                 f"must be a power of 2 >= 2, got {patch_size}; use stem='patch' otherwise")
            layers: list[nn.Module] = []
            channels = in_chans
            for i in range(n):
                width = max(1, dim // 2 ** (n - 1 - i))
                layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                channels = width
            self.proj = nn.Sequential(*layers, nn.Conv2d(channels, dim, 1))
        else:
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def resize_pos_embed(pos_embed: Tensor, new_grid: int, num_prefix_tokens: int = 1) -> Tensor:
    """Bilinearly resize a ``[1, prefix + g*g, D]`` position embedding to another grid (new resolution)."""
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = int(math.isqrt(grid_tokens.shape[1]))
    if old_grid * old_grid != grid_tokens.shape[1]:
        raise ValueError(f"position embedding has {grid_tokens.shape[1]} grid tokens, not a square")
    if old_grid == new_grid:
        return pos_embed
    D = pos_embed.shape[-1]
    g = grid_tokens.reshape(1, old_grid, old_grid, D).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(new_grid, new_grid), mode="bilinear", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(pos_embed.dtype)
    return torch.cat([prefix, g], dim=1)


def embed_images(images: Tensor, patch_embed: PatchEmbed, pos_embed: Tensor,
                 prefix_tokens: Optional[Tensor] = None) -> Tensor:
    """The ViT front end shared by every image family: input checks, patch embedding, optional prefix tokens
    (e.g. a CLS token ``[1, P, D]``), position embedding ``[1, P + N, D]``.

    images [B, C, H, W] -> tokens [B, P + N, D]. The families keep their own parameters (their names are part of
    the published checkpoints); this is the one place that combines them.
    """
    validate_images(images, patch_embed.in_chans, patch_embed.image_size, pos_embed.dtype)
    x = patch_embed(images)
    if prefix_tokens is not None:
        x = torch.cat([prefix_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    return x + pos_embed.to(images.dtype)


def resize_grid_pos_embed(found: Tensor, target_shape: Sequence[int], num_prefix_tokens: int) -> Optional[Tensor]:
    """A checkpoint's image position embedding ``[1, P + g*g, D]`` resized to ``target_shape`` ``[1, P + h*h, D]``
    (same P prefix tokens, same D), or None when the shapes are not two square grids with those prefix tokens
    (the caller then reports the shape mismatch)."""
    if found.ndim != 3 or len(target_shape) != 3 or found.shape[-1] != target_shape[-1]:
        return None
    old, new = found.shape[1] - num_prefix_tokens, target_shape[1] - num_prefix_tokens
    grid = math.isqrt(max(new, 0))
    if old <= 0 or new <= 0 or grid * grid != new or math.isqrt(old) ** 2 != old:
        return None
    return resize_pos_embed(found, grid, num_prefix_tokens)
