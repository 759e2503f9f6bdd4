"""The one implementation of the MLP activations, shared by dense MLPs (:class:`zoo.layers.Mlp`), the MoE experts
and the reference MoE (:mod:`zoo.moe.dispatch`). The fused GPU kernels (:mod:`zoo.kernels`) implement the same
formulas for the names they list."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "swiglu")


def apply_activation(h: Tensor, activation: str) -> Tensor:
    """``gelu`` (exact, as timm/torch default), ``gelu_tanh`` (V-MoE / Flax default), ``quick_gelu``
    (``x * sigmoid(1.702 x)``, OpenAI CLIP's towers; not in the fused kernels), ``swiglu``
    (``silu(gate) * up`` with ``h = [gate | up]`` on the last axis: ``[..., 2H] -> [..., H]``)."""
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "quick_gelu":
        return h * torch.sigmoid(1.702 * h)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
