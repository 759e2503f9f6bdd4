"""Causal self-attention of decoder LMs: grouped-query heads, RoPE, optional q/k norms and a KV cache."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.layers.kv_cache import KVCache
from zoo.layers.norm import RMSNorm
from zoo.layers.rope import RotaryEmbedding


class DecoderAttention(nn.Module):
    """``H`` query heads and ``Hkv`` key/value heads of width ``hd`` (grouped-query attention when Hkv < H: each
    key/value head serves H / Hkv query heads).

    Projections are ``q_proj``/``k_proj``/``v_proj`` or one fused ``qkv`` (rows ``[q | k | v]``), and ``o_proj``.
    ``qk_norm`` (OLMoE): RMSNorm over the whole projected q ([H * hd]) and k ([Hkv * hd]) before the heads split.

    ``forward(x [B, S, D], cos, sin [B, 1, S, R], attn_mask [B, 1, S, T] bool, cache, slots [S]) -> [B, S, D]``;
    without a cache T = S and the keys are this call's.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, rope: RotaryEmbedding,
                 layer_index: int, qkv_bias: bool = False, out_bias: bool = False, fused_qkv: bool = False,
                 qk_norm: bool = False, norm_eps: float = 1e-6) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_index = layer_index
        q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        if fused_qkv:
            self.qkv = nn.Linear(dim, q_dim + 2 * kv_dim, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, q_dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, kv_dim, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, kv_dim, bias=qkv_bias)
        self.fused_qkv = fused_qkv
        self.q_norm = RMSNorm(q_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(kv_dim, norm_eps) if qk_norm else None
        self.o_proj = nn.Linear(q_dim, dim, bias=out_bias)
        self.rope = rope

    @torch.no_grad()
    def fuse_qkv_(self) -> "DecoderAttention":
        """Replace ``q_proj`` / ``k_proj`` / ``v_proj`` by one ``qkv`` projection, their rows stacked
        ``[q | k | v]`` (in place; a no-op when already fused). Same outputs: every output element is the same dot product, only
        computed by one GEMM (a decode step reads the same bytes in one GEMV instead of three short ones)."""
        if self.fused_qkv:
            return self
        parts = (self.q_proj, self.k_proj, self.v_proj)
        w = parts[0].weight
        qkv = nn.Linear(w.shape[1], sum(self.split), bias=parts[0].bias is not None, device=w.device, dtype=w.dtype)
        qkv.weight.copy_(torch.cat([m.weight for m in parts]))
        if qkv.bias is not None:
            qkv.bias.copy_(torch.cat([m.bias for m in parts]))
        qkv.weight.requires_grad_(w.requires_grad)
        if qkv.bias is not None:
            qkv.bias.requires_grad_(parts[0].bias.requires_grad)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv, self.fused_qkv = qkv, True
        return self

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor, cache: Optional[KVCache] = None,
                slots: Optional[Tensor] = None) -> Tensor:
        B, S, _ = x.shape
        if self.fused_qkv:
            q, k, v = self.qkv(x).split(self.split, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, S, hd]
        k = k.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, hd]
        v = v.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, slots, k, v)  # [B, Hkv, T, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))
