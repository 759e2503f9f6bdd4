"""Rotary position embeddings (RoPE, Su et al. 2021) in the GPT-NeoX half-rotation layout.

The first ``rotary_dim = round(head_dim * rotary_fraction)`` channels of each head are rotated (partial
rotary: Phi-2 0.4, StableLM-2 0.25), the rest pass through. Within the rotated channels, channel ``i`` pairs
with channel ``i + rotary_dim / 2`` (not the interleaved ``2i, 2i+1`` layout of the original paper), which is
the layout of the LLaMA / Qwen / NeoX checkpoints. Positions are given per token ([B, S]), so a left-padded
batch rotates each sequence from its own first real token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """``cos_sin(positions [B, S]) -> (cos, sin)`` each ``[B, 1, S, rotary_dim]``; ``apply(x [B, H, S, hd], cos,
    sin)`` rotates the first ``rotary_dim`` channels of every head."""

    def __init__(self, head_dim: int, base: float = 10000.0, rotary_fraction: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < rotary_fraction <= 1.0:
            raise ValueError(f"rotary_fraction must be in (0, 1], got {rotary_fraction}")
        rotary_dim = int(head_dim * rotary_fraction)
        if rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(f"head_dim * rotary_fraction = {head_dim} * {rotary_fraction} gives {rotary_dim} rotary "
                             "channels; it must be even and >= 2")
        self.head_dim, self.rotary_dim, self.base = head_dim, rotary_dim, base
        # Not a parameter and not saved: it is a function of the config (checkpoints never carry it).
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> Tensor:
        R = self.rotary_dim
        return 1.0 / (self.base ** (torch.arange(0, R, 2, dtype=torch.float32) / R))

    def reset_buffers(self) -> None:
        """Re-create ``inv_freq`` on the CPU (after a build on the meta device, :func:`zoo.convert.empty_init`)."""
        with torch.device("cpu"):
            self.inv_freq = self._inv_freq()

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Angles in float32 (positions in the thousands lose precision in bf16), returned in ``dtype``."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)  # [B, S, R/2]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, S, R]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def apply(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        R = self.rotary_dim
        rot, rest = x[..., :R], x[..., R:]
        first, second = rot[..., : R // 2], rot[..., R // 2:]
        rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin
        return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}"
