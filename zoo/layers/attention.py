"""Multi-head self-attention for encoders (bidirectional, padding mask) and decoders (causal)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Self-attention with a fused ``qkv`` projection (timm's layout, so timm weights load directly).

    ``forward(x [B, S, D], mask [B, S] bool (True = real token), causal)``: masked keys receive no
    attention; queries at masked positions still produce (ignored) outputs.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).reshape(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if mask is not None:
            attn_mask = mask[:, None, None, :].to(torch.bool)  # [B, 1, 1, S] keys
            if causal:
                attn_mask = attn_mask & torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
                causal = False
            # A query whose every key is masked (e.g. a padded row) would give NaN: let it see itself.
            attn_mask = attn_mask | torch.eye(S, dtype=torch.bool, device=x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, S, D)))
