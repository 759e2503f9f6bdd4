"""Sparse upcycling (Komatsuzaki et al. 2023): turn a trained dense transformer into an MoE one whose
experts all start as copies of the dense MLP they replace.

Works on the zoo's own transformers (``zoo.models.Transformer``: V-MoE, LIMoE, decoders) and on timm's
``VisionTransformer`` family (any model with ``.blocks[i].mlp`` being a timm ``Mlp`` or ``SwiGLU``).
With ``renormalize=True`` and capacity for every token, the upcycled model computes exactly the dense
model's function at initialisation, because identical experts combined with weights summing to 1 give
back the dense MLP's output.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Optional, Sequence

import torch
from torch import nn

from zoo.moe.config import MoEConfig
from zoo.moe.layer import MoELayer


def _blocks(model: nn.Module) -> Sequence[nn.Module]:
    from zoo.models.transformer import Transformer

    if isinstance(model, Transformer):
        return model.blocks
    zoo_transformers = [m for m in model.modules() if isinstance(m, Transformer)]
    if len(zoo_transformers) == 1:
        return zoo_transformers[0].blocks
    if len(zoo_transformers) > 1:
        raise ValueError(f"{type(model).__name__} has {len(zoo_transformers)} transformers; pass the one to "
                         "upcycle, e.g. zoo.upcycle(model.text_decoder, ...)")
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and all(hasattr(b, "mlp") for b in blocks):
        return blocks
    raise TypeError(f"cannot find transformer blocks with an .mlp in {type(model).__name__}; upcycle supports "
                    "zoo transformers and timm VisionTransformer-style models (model.blocks[i].mlp)")


def _dense_mlp_weights(mlp: nn.Module):
    """(activation, fc1 weight [H', D], fc1 bias, fc2 weight [D, H], fc2 bias) of a dense MLP."""
    from zoo.layers.mlp import Mlp

    if isinstance(mlp, Mlp):
        return mlp.activation, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
    name = type(mlp).__name__
    norm = getattr(mlp, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise ValueError(f"cannot upcycle a {name} with a hidden-layer norm ({type(norm).__name__})")
    if hasattr(mlp, "fc1_g") and hasattr(mlp, "fc1_x"):  # timm SwiGLU: act(fc1_g(x)) * fc1_x(x)
        act = getattr(mlp, "act", None)
        if not isinstance(act, nn.SiLU):
            raise ValueError(f"cannot upcycle {name} with activation {type(act).__name__}; only SiLU (SwiGLU)")
        w1 = torch.cat([mlp.fc1_g.weight, mlp.fc1_x.weight])
        b1 = None if mlp.fc1_g.bias is None else torch.cat([mlp.fc1_g.bias, mlp.fc1_x.bias])
        return "swiglu", w1, b1, mlp.fc2.weight, mlp.fc2.bias
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):  # timm Mlp: fc2(act(fc1(x)))
        act = getattr(mlp, "act", None)
        if isinstance(act, nn.GELU):
            activation = "gelu_tanh" if act.approximate == "tanh" else "gelu"
        else:
            raise ValueError(f"cannot upcycle {name} with activation {type(act).__name__}; supported: GELU "
                             "(exact or tanh) and SwiGLU")
        return activation, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
    raise TypeError(f"cannot upcycle MLP of type {name}: expected zoo Mlp, timm Mlp or timm SwiGLU")


def upcycle(model: nn.Module, num_experts: int = 8, top_k: int = 2, moe_layers: Optional[Sequence[int]] = None,
            every: Optional[int] = None, last: Optional[int] = None, **moe_kwargs: Any) -> nn.Module:
    """Replace the dense MLPs of the chosen blocks by MoE layers initialised from them (in place).

    Args:
        model: a zoo model/transformer or a timm VisionTransformer.
        num_experts, top_k: E and k.
        moe_layers / every / last: which blocks (explicit 0-based indices, every n-th, or the last n odd
            blocks, as :func:`zoo.models.transformer.resolve_moe_layers`); none given = every block.
        **moe_kwargs: any other :class:`MoEConfig` field (``renormalize``, ``capacity_factor``,
            ``dropless``, ``group_size``, loss weights, ...).
    Returns:
        the same ``model``, upcycled.
    """
    from zoo.models.transformer import resolve_moe_layers

    valid = {f.name for f in fields(MoEConfig)} - {"num_experts", "top_k", "activation", "expert_bias"}
    unknown = set(moe_kwargs) - valid
    if unknown:
        from zoo.config import unknown_key_message

        raise TypeError(unknown_key_message(sorted(unknown)[0], valid, "upcycle(**moe_kwargs)"))
    blocks = _blocks(model)
    indices = resolve_moe_layers(len(blocks), every, last, tuple(moe_layers) if moe_layers is not None else None)
    if moe_layers is None and every is None and last is None:
        indices = tuple(range(len(blocks)))
    for i in indices:
        mlp = blocks[i].mlp
        if isinstance(mlp, MoELayer):
            raise ValueError(f"block {i} is already an MoE layer")
        activation, w1, b1, w2, b2 = _dense_mlp_weights(mlp)
        dim, hidden = w2.shape[0], w2.shape[1]
        cfg = MoEConfig(num_experts=num_experts, top_k=top_k, activation=activation, expert_bias=b1 is not None,
                        **moe_kwargs)
        layer = MoELayer(dim, hidden, cfg).to(device=w1.device, dtype=w1.dtype)
        layer.experts.load_dense(w1, b1, w2, b2)
        layer.train(mlp.training)
        blocks[i].mlp = layer
    return model
