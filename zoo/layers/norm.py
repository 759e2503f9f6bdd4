"""Token norms of decoder LMs: RMSNorm (LLaMA, Qwen, Mixtral, OLMoE) or LayerNorm (StableLM-2, Phi-2)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

NormType = Literal["rmsnorm", "layernorm"]


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, computed in float32 and cast back before the
    scale (the order LLaMA's reference uses, so converted weights give the same numbers)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: NormType, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """``"rmsnorm"`` -> :class:`RMSNorm`; ``"layernorm"`` -> ``nn.LayerNorm`` (with or without a bias)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    raise ValueError(f"unknown norm {kind!r}; expected 'rmsnorm' or 'layernorm'")
