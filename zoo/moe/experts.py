"""Experts stored stacked, so every dispatcher (and the fused kernel) reads the same tensors."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def apply_activation(h: Tensor, activation: str) -> Tensor:
    """``gelu`` (exact, as timm/torch default), ``gelu_tanh`` (V-MoE / Flax default), ``swiglu``
    (``silu(gate) * up`` with ``h = [gate | up]`` on the last axis)."""
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise ValueError(f"unknown activation {activation!r}; expected 'gelu', 'gelu_tanh' or 'swiglu'")


class StackedExperts(nn.Module):
    """E two-layer MLP experts with weights stacked on a leading expert axis.

    Parameters: ``w1 [E, D, H]`` (SwiGLU: ``[E, D, 2H]``, gate columns then up columns), ``b1 [E, H']``,
    ``w2 [E, H, D]``, ``b2 [E, D]`` (biases optional). ``w[e]`` is used as ``x @ w[e]`` (input-major, like
    V-MoE's Flax kernels), the transpose of ``nn.Linear.weight``.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "gelu_tanh",
                 bias: bool = True) -> None:
        super().__init__()
        apply_activation(torch.zeros(1, 2), activation)  # validate the name early
        self.num_experts, self.dim, self.hidden_dim, self.activation = num_experts, dim, hidden_dim, activation
        h1 = 2 * hidden_dim if activation == "swiglu" else hidden_dim
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, h1))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b1: Optional[nn.Parameter] = nn.Parameter(torch.zeros(num_experts, h1)) if bias else None
        self.b2: Optional[nn.Parameter] = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init for every expert family member as a dense timm/ViT MLP: trunc normal 0.02, zero bias.
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)
        if self.b1 is not None:
            nn.init.zeros_(self.b1)
            nn.init.zeros_(self.b2)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` on tokens ``x`` [N, D] -> [N, D]."""
        h = x @ self.w1[e]
        if self.b1 is not None:
            h = h + self.b1[e]
        y = apply_activation(h, self.activation) @ self.w2[e]
        return y + self.b2[e] if self.b2 is not None else y

    def forward_grouped(self, x_sorted: Tensor, counts: list[int]) -> Tensor:
        """Tokens sorted by expert, ``counts[e]`` rows for expert e: [N, D] -> [N, D]."""
        outs = [self.expert(e, chunk) for e, chunk in enumerate(torch.split(x_sorted, counts)) if chunk.numel()]
        return torch.cat(outs) if outs else x_sorted.new_zeros(0, self.dim)

    def forward_dense(self, x: Tensor) -> Tensor:
        """Each expert on its own buffer: ``x`` [E, N, D] -> [E, N, D] (Soft MoE slots, einsum dispatch)."""
        h = torch.bmm(x, self.w1)
        if self.b1 is not None:
            h = h + self.b1.unsqueeze(1)
        y = torch.bmm(apply_activation(h, self.activation), self.w2)
        return y + self.b2.unsqueeze(1) if self.b2 is not None else y

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation!r}, bias={self.b1 is not None}")

    def load_dense(self, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                   fc2_bias: Optional[Tensor]) -> None:
        """Make every expert a copy of a dense MLP given as ``nn.Linear`` weights (sparse upcycling)."""
        with torch.no_grad():
            if tuple(fc1_weight.shape) != (self.w1.shape[2], self.dim) or tuple(fc2_weight.shape) != (self.dim, self.hidden_dim):
                raise ValueError(
                    f"dense MLP shapes fc1 {tuple(fc1_weight.shape)}, fc2 {tuple(fc2_weight.shape)} do not match "
                    f"experts (D={self.dim}, H={self.hidden_dim}, activation={self.activation})")
            self.w1.copy_(fc1_weight.t().unsqueeze(0).expand_as(self.w1))
            self.w2.copy_(fc2_weight.t().unsqueeze(0).expand_as(self.w2))
            if self.b1 is not None:
                if fc1_bias is None or fc2_bias is None:
                    raise ValueError("experts have biases but the dense MLP has none")
                self.b1.copy_(fc1_bias.unsqueeze(0).expand_as(self.b1))
                self.b2.copy_(fc2_bias.unsqueeze(0).expand_as(self.b2))

    def flops_per_token(self) -> int:
        mult = 3 if self.activation == "swiglu" else 2
        return 2 * mult * self.dim * self.hidden_dim


