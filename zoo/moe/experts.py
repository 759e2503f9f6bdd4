"""The experts seam: what every dispatcher (and the fused GPU path) calls, and the stacked experts that implement it.

:class:`Experts` is the interface. A dispatcher calls ``expert(e, x)`` (the reference loop), ``forward_grouped``
(tokens sorted by expert) or ``forward_dense`` (one buffer per expert, Soft MoE). ``stacked()`` returns the
experts as stacked tensors (:class:`StackedWeights`) when the fused GPU kernel can serve them, else None (then the
layer takes a reference dispatcher). Other experts plug in by subclassing :class:`Experts`: LoRA experts (Uni-MoE:
a frozen shared FFN plus per-expert low-rank deltas) implement ``expert`` and may return their merged weights
(``base + A @ B``, differentiable) from ``stacked()`` to take the fused path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from zoo.layers.activations import apply_activation


@dataclass(frozen=True)
class StackedWeights:
    """E two-layer MLPs as stacked tensors, the layout the fused kernel reads: ``w1 [E, D, H]`` (SwiGLU:
    ``[E, D, 2H]``, gate columns then up columns), ``b1 [E, H or 2H]`` or None, ``w2 [E, H, D]``, ``b2 [E, D]`` or
    None. ``w[e]`` is used as ``x @ w[e]`` (input-major, V-MoE's Flax layout: the transpose of ``nn.Linear``)."""

    w1: Tensor
    b1: Optional[Tensor]
    w2: Tensor
    b2: Optional[Tensor]
    activation: str

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` on tokens ``x`` [N, D] -> [N, D]."""
        h = x @ self.w1[e]
        if self.b1 is not None:
            h = h + self.b1[e]
        y = apply_activation(h, self.activation) @ self.w2[e]
        return y + self.b2[e] if self.b2 is not None else y

    def forward_dense(self, x: Tensor) -> Tensor:
        """Each expert on its own buffer: ``x`` [E, N, D] -> [E, N, D]."""
        h = torch.bmm(x, self.w1)
        if self.b1 is not None:
            h = h + self.b1.unsqueeze(1)
        y = torch.bmm(apply_activation(h, self.activation), self.w2)
        return y + self.b2.unsqueeze(1) if self.b2 is not None else y


class Experts(nn.Module):
    """E experts of width ``dim`` (D) with hidden width ``hidden_dim`` (H): the interface dispatchers call.

    Subclasses implement :meth:`expert`; the other methods have plain defaults built on it. Set ``num_experts``,
    ``dim``, ``hidden_dim`` and ``activation`` (the name the shared expert and reports use).
    """

    num_experts: int
    dim: int
    hidden_dim: int
    activation: str

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` on tokens ``x`` [N, D] -> [N, D]."""
        raise NotImplementedError

    def forward_grouped(self, x_sorted: Tensor, counts: list[int]) -> Tensor:
        """Tokens sorted by expert, ``counts[e]`` rows for expert e: [N, D] -> [N, D]."""
        outs = [self.expert(e, chunk) for e, chunk in enumerate(torch.split(x_sorted, counts)) if chunk.numel()]
        return torch.cat(outs) if outs else x_sorted.new_zeros(0, self.dim)

    def forward_dense(self, x: Tensor) -> Tensor:
        """Each expert on its own buffer: ``x`` [E, N, D] -> [E, N, D] (Soft MoE slots)."""
        return torch.stack([self.expert(e, x[e]) for e in range(self.num_experts)])

    def stacked(self) -> Optional[StackedWeights]:
        """The experts as stacked tensors for the fused GPU kernel, or None when they have no such form."""
        return None


class StackedExperts(Experts):
    """E two-layer MLP experts with weights stacked on a leading expert axis (:class:`StackedWeights` layout).

    Parameters: ``w1 [E, D, H]`` (SwiGLU: ``[E, D, 2H]``, gate columns then up columns), ``b1 [E, H']``,
    ``w2 [E, H, D]``, ``b2 [E, D]`` (biases optional). Activation "gelu", "gelu_tanh" or "swiglu".
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

    def stacked(self) -> StackedWeights:
        return StackedWeights(self.w1, self.b1, self.w2, self.b2, self.activation)

    def expert(self, e: int, x: Tensor) -> Tensor:
        return self.stacked().expert(e, x)

    def forward_dense(self, x: Tensor) -> Tensor:
        return self.stacked().forward_dense(x)

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
