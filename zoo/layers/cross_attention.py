"""Multi-head cross-attention: queries from one sequence, keys and values from another (encoder output)."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn


class CrossAttention(nn.Module):
    """``forward(x [B, Q, D], context [B, S, Dc], context_mask [B, S] bool (True = real frame)) -> [B, Q, D]``.

    Projections: ``q`` (D -> D), one fused ``kv`` (Dc -> 2D, rows ``[k | v]``, like :class:`~zoo.layers.Attention`'s
    fused ``qkv``), ``proj`` (D -> D). Masked context positions receive no attention. Each row needs at least one
    real context position (an all-masked row has nothing to attend to and gives NaN); this layer does not check it
    because the check would read the mask back to the host on every call: callers that take user masks check once.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: Optional[int] = None, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        context_dim = dim if context_dim is None else context_dim
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)

    def forward(self, x: Tensor, context: Tensor, context_mask: Optional[Tensor] = None) -> Tensor:
        B, Q, D = x.shape
        S = context.shape[1]
        q = self.q(x).reshape(B, Q, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(B, S, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if context_mask is not None:
            if context_mask.shape != (B, S):
                raise ValueError(f"context_mask must be [B, S] = {(B, S)}, got {tuple(context_mask.shape)}")
            attn_mask = context_mask[:, None, None, :].bool()  # [B, 1, 1, S]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, Q, D)))
