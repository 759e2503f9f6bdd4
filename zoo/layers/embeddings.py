"""Patch and position embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` patches -> D: [B, C, H, W] -> [B, (H/p)*(W/p), D]."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
        self.image_size, self.patch_size, self.in_chans = image_size, patch_size, in_chans
        self.grid = image_size // patch_size
        self.num_patches = self.grid**2
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

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
