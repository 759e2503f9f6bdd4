"""Plain-PyTorch reference of the fused MoE expert contract (per-expert loop).

Used as ground truth by the kernel tests and by the benchmark's error column.  It is
deliberately simple: no sorting tricks, one masked matmul pair per expert.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from zoo.moe.experts import apply_activation  # the one activation implementation, shared with the experts

ACTIVATIONS = ("gelu_tanh", "swiglu")  # what the fused kernels implement


def reference_moe(
    x: Tensor,
    expert_index: Tensor,
    combine_weight: Tensor,
    keep: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    activation: str = "gelu_tanh",
) -> Tensor:
    """y[t] = sum_k keep[t,k] * cw[t,k] * (act(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e]), e = expert_index[t,k].

    Differentiable with respect to every floating-point input.  Computation happens in the
    dtype of the inputs (pass float64/float32 copies for a high-precision reference).
    """
    T, D = x.shape
    E = w1.shape[0]
    K = expert_index.shape[1]
    y = x.new_zeros(T, D)
    keep = keep.bool()
    for e in range(E):
        sel = (expert_index == e) & keep  # [T, K]
        tok, slot = sel.nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w1[e]
        if b1 is not None:
            h = h + b1[e]
        a = apply_activation(h, activation)
        o = a @ w2[e]
        if b2 is not None:
            o = o + b2[e]
        o = o * combine_weight[tok, slot].to(o.dtype)[:, None]
        y = y.index_add(0, tok, o)
    del K
    return y
