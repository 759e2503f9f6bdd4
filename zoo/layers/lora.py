"""LoRA (Hu et al. 2021) on linear layers: a frozen base ``W`` plus a trainable low-rank delta ``(alpha / r) B A``.

Uni-MoE v1 stage 3 puts LoRA on the LM's linears (its PEFT config: every ``nn.Linear`` of the LM except ``lm_head``,
the routers and the multimodal modules); which linears is the CALLER's choice, given by module names, so no name
pattern is baked in here (a recipe names them, or a freeze group, through :class:`zoo.models.lora_spec.LoRASpec`).
``B`` starts at zero, so a fresh LoRA layer computes exactly its base; :func:`merge_lora` folds the delta into plain
``nn.Linear`` layers for inference (same outputs, no extra matmuls).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) * dropout(x) @ A^T @ B^T``; ``A [r, in]`` (Kaiming-uniform as PEFT), ``B [out, r]``
    (zeros). The base's weight and bias are frozen."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.base, self.r, self.alpha = base, int(r), float(alpha)
        self.scaling = self.alpha / self.r
        for p in self.base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora_parameters(self) -> list[nn.Parameter]:
        """The trainable low-rank factors (the ``lora`` freeze group)."""
        return [self.lora_A, self.lora_B]

    def delta_weight(self) -> Tensor:
        """``(alpha / r) B A`` [out, in]: what merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + (alpha / r) B A`` (and the base bias)."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta_weight())
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out

    def extra_repr(self) -> str:
        return f"in={self.base.in_features}, out={self.base.out_features}, r={self.r}, alpha={self.alpha}"


def apply_lora(model: nn.Module, names: Iterable[str], r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> list[str]:
    """Replace the ``nn.Linear`` submodules called ``names`` (full dotted names, as ``named_modules`` gives them) by
    :class:`LoRALinear` wrappers, in place. Returns the names replaced; a name that is missing or not an
    ``nn.Linear`` is an error (nothing is replaced then)."""
    names = list(names)
    modules = dict(model.named_modules())
    bad = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if bad:
        raise ValueError(f"apply_lora: {bad[:4]} {'are' if len(bad) > 1 else 'is'} not nn.Linear modules of "
                         f"{type(model).__name__} (give full names as model.named_modules() lists them)")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, LoRALinear(modules[name], r=r, alpha=alpha, dropout=dropout))
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold every :class:`LoRALinear` of ``model`` into a plain ``nn.Linear``, in place; returns how many."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    modules = dict(model.named_modules())
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer.merged())
    return len(targets)


__all__ = ["LoRALinear", "apply_lora", "merge_lora"]
