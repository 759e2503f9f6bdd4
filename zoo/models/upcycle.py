"""Sparse upcycling (Komatsuzaki et al. 2023): turn a trained dense transformer into an MoE one whose experts all
start as copies of the dense MLP they replace (optionally perturbed so they can diverge).

Works on the zoo's transformers (V-MoE / LIMoE encoders, :class:`zoo.models.decoder.DecoderLM`), timm's
``VisionTransformer`` family (``model.blocks[i].mlp`` a timm ``Mlp`` or ``SwiGLU``) and transformers causal LMs
whose blocks have a gated ``mlp`` (``gate_proj`` / ``up_proj`` / ``down_proj``: LLaMA, Qwen2, StableLM) or a
two-layer ``mlp`` (``fc1`` / ``fc2``: Phi). With identical experts, ``renormalize=True`` and room for every token,
the upcycled model computes exactly the dense model's function, because k identical experts combined with weights
summing to 1 give back the dense MLP's output.
"""

from __future__ import annotations

import copy
from dataclasses import fields, replace
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe.config import MoEConfig
from zoo.moe.layer import MoELayer

# Decoder LMs route like Mixtral / MoE-LLaVA unless told otherwise: causal-safe (dropless, every token alone),
# noise-free, renormalised top-k so the upcycled model starts as the dense one.
CAUSAL_LM_ROUTING = dict(renormalize=True, dropless=True, noise_std=0.0, batch_priority=False, group_size=1,
                         importance_loss_weight=0.0, load_loss_weight=0.0, switch_loss_weight=0.01)


def _blocks(model: nn.Module) -> tuple[Sequence[nn.Module], bool]:
    """``(blocks that have an .mlp, is_causal_lm)``."""
    from zoo.models.decoder import DecoderLM
    from zoo.models.transformer import Transformer

    if isinstance(model, DecoderLM):
        return model.blocks, True
    if isinstance(model, Transformer):
        return model.blocks, False
    zoo_transformers = [m for m in model.modules() if isinstance(m, (Transformer, DecoderLM))]
    if len(zoo_transformers) == 1:
        return _blocks(zoo_transformers[0])
    if len(zoo_transformers) > 1:
        raise ValueError(f"{type(model).__name__} has {len(zoo_transformers)} transformers; pass the one to "
                         "upcycle, e.g. zoo.upcycle(model.text_decoder, ...)")
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and all(hasattr(b, "mlp") for b in blocks):
        return blocks, False
    # A transformers causal LM: exactly one list of layers that all have an .mlp (model.model.layers).
    lists = [m for m in model.modules()
             if isinstance(m, nn.ModuleList) and len(m) and all(hasattr(b, "mlp") for b in m)]
    if len(lists) == 1 and hasattr(model, "generate"):
        return lists[0], True
    raise TypeError(f"cannot find transformer blocks with an .mlp in {type(model).__name__}; upcycle supports "
                    "zoo transformers and decoders, timm VisionTransformer-style models (model.blocks[i].mlp) and "
                    "transformers causal LMs (LLaMA, Qwen2, StableLM, Phi)")


_PROBE = torch.linspace(-5, 5, 41)
_ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


def _activation_name(act: Optional[nn.Module], where: str) -> str:
    """Which of GELU (exact / tanh) or SiLU the module ``act`` computes, found by evaluating it (libraries name their
    activation classes differently; the function is what matters)."""
    if act is not None:
        with torch.no_grad():
            y = act(_PROBE)
        for name, fn in _ACTIVATIONS.items():
            if torch.allclose(y, fn(_PROBE), atol=1e-6):
                return name
    raise ValueError(f"cannot upcycle {where} with activation {type(act).__name__}; supported: GELU (exact or "
                     "tanh) and SiLU gates (SwiGLU)")


def _dense_mlp_weights(mlp: nn.Module):
    """(activation, fc1 weight [H', D], fc1 bias, fc2 weight [D, H], fc2 bias) of a dense MLP."""
    from zoo.layers.mlp import Mlp

    if isinstance(mlp, Mlp):
        return mlp.activation, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
    name = type(mlp).__name__
    norm = getattr(mlp, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise ValueError(f"cannot upcycle a {name} with a hidden-layer norm ({type(norm).__name__})")
    gated = {"fc1_g": ("fc1_g", "fc1_x", "fc2", "act"), "gate_proj": ("gate_proj", "up_proj", "down_proj", "act_fn")}
    for key, (gate, up, down, act) in gated.items():  # timm SwiGLU / transformers LLaMA-style: down(act(gate) * up)
        if hasattr(mlp, key):
            if _activation_name(getattr(mlp, act, None), name) != "silu":
                raise ValueError(f"cannot upcycle {name}: its gate activation is not SiLU (only SwiGLU is supported)")
            g, u, d = getattr(mlp, gate), getattr(mlp, up), getattr(mlp, down)
            w1 = torch.cat([g.weight, u.weight])
            b1 = None if g.bias is None else torch.cat([g.bias, u.bias])
            return "swiglu", w1, b1, d.weight, d.bias
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):  # timm Mlp / transformers Phi: fc2(act(fc1(x)))
        act = getattr(mlp, "act", getattr(mlp, "activation_fn", None))
        activation = _activation_name(act, name)
        if activation == "silu":
            raise ValueError(f"cannot upcycle {name}: an ungated SiLU MLP has no zoo expert activation")
        return activation, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
    raise TypeError(f"cannot upcycle MLP of type {name}: expected zoo Mlp, timm Mlp / SwiGLU or a transformers "
                    "gated (gate_proj/up_proj/down_proj) or fc1/fc2 MLP")


def upcycle(model: nn.Module, num_experts: int = 8, top_k: int = 2,
            moe_layers: Union[str, Sequence[int], None] = None, every: Optional[int] = None,
            last: Optional[int] = None, noise: float = 0.0, inplace: bool = False,
            generator: Optional[torch.Generator] = None, **moe_kwargs: Any) -> nn.Module:
    """An MoE model whose chosen blocks' dense MLPs became MoE layers initialised from them.

    Args:
        model: a zoo model / transformer / decoder, a timm VisionTransformer or a transformers causal LM.
        num_experts, top_k: E and k.
        moe_layers / every / last: which blocks: a placement ("all", "sparse" = 0, 2, 4, ..., "first_half",
            "second_half", "dense") or explicit 0-based indices, or V-MoE's every n-th / last n odd blocks
            (:func:`zoo.models.decoder.decoder_moe_layers`); none given = every block.
        noise: each expert's copy gets Gaussian noise of std ``noise * std(dense weight)`` on every weight, so the
            experts can diverge (0 = exact copies: the upcycled model equals the dense one).
        inplace: False (default) upcycles and returns a deep copy and leaves ``model`` dense; True changes ``model``
            itself (no second copy of the weights in memory) and returns it.
        generator: the noise's random generator.
        **moe_kwargs: any other :class:`MoEConfig` field (``renormalize``, ``capacity_factor``, ``dropless``,
            ``group_size``, loss weights, ...). Decoder LMs default to :data:`CAUSAL_LM_ROUTING` (dropless,
            renormalised, every sequence routed alone); vision models to MoEConfig's (V-MoE) defaults.

    A :class:`~zoo.models.decoder.DecoderLM`'s config records the new MoE layers, so ``save_pretrained`` /
    ``create_model("local-dir:...")`` rebuild it. A transformers model's MoE layers see no attention mask (its
    blocks call ``mlp(x)``), so padding tokens are routed too.
    """
    from zoo.models.decoder import DecoderLM, decoder_moe_layers

    valid = {f.name for f in fields(MoEConfig)} - {"num_experts", "top_k", "activation", "expert_bias"}
    unknown = set(moe_kwargs) - valid
    if unknown:
        from zoo.config import unknown_key_message

        raise TypeError(unknown_key_message(sorted(unknown)[0], valid, "upcycle(**moe_kwargs)"))
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    blocks, causal_lm = _blocks(model)
    if moe_layers is None and every is None and last is None:
        indices = tuple(range(len(blocks)))
    else:
        indices = decoder_moe_layers(len(blocks), moe_layers, every, last)
    for i in indices:
        if isinstance(blocks[i].mlp, MoELayer):
            raise ValueError(f"block {i} is already an MoE layer")
    if not inplace:
        model = copy.deepcopy(model)
        blocks, _ = _blocks(model)
    routing = {**(CAUSAL_LM_ROUTING if causal_lm else {}), **moe_kwargs}
    cfg = None
    for i in indices:
        mlp = blocks[i].mlp
        activation, w1, b1, w2, b2 = _dense_mlp_weights(mlp)
        dim, hidden = w2.shape[0], w2.shape[1]
        cfg = MoEConfig(num_experts=num_experts, top_k=top_k, activation=activation, expert_bias=b1 is not None,
                        **routing)
        layer = MoELayer(dim, hidden, cfg, causal=causal_lm)
        layer = layer.to(device=w1.device, dtype=w1.dtype)
        layer.experts.load_dense(w1, b1, w2, b2)
        if noise:
            with torch.no_grad():
                for p, dense in ((layer.experts.w1, w1.t()), (layer.experts.w2, w2.t())):
                    p.add_(torch.randn(p.shape, generator=generator).to(p) * noise * dense.float().std().to(p))
        layer.train(mlp.training)
        blocks[i].mlp = layer
    if isinstance(model, DecoderLM) and cfg is not None:
        old = model.config
        if old.moe is not None and old.moe != cfg:
            raise ValueError("this decoder already has MoE layers with another config; a DecoderConfig holds one "
                             "MoE config, so upcycle it with the same settings or upcycle the dense model")
        if old.moe_mlp_dim not in (None, hidden) or hidden != old.mlp_dim:
            raise ValueError("the decoder's MoE experts would differ in width from its config; upcycle the dense model")
        model.config = replace(old, moe=cfg, moe_placement=None, moe_every=None, moe_last=None,
                               moe_layers=tuple(sorted(set(old.moe_layer_indices) | set(indices))))
    return model


def upcycle_multimodal_decoder(model: nn.Module, moe: MoEConfig,
                          placement: Union[str, Sequence[int]] = "sparse") -> nn.Module:
    """MoE-Tuning stage III's start (and Uni-MoE's stage 3): a COPY of the stage-II (dense) ``model`` whose decoder FFNs at ``placement``
    ("sparse" = blocks 0, 2, 4, ...; see :func:`zoo.models.decoder.decoder_moe_layers`) became MoE layers of config
    ``moe``, every expert a copy of the FFN it replaces and the router fresh (:func:`zoo.upcycle`). The encoders and
    connectors are copied unchanged. ``moe.activation`` / ``moe.expert_bias`` must be the dense FFN's (the experts are
    its copies). Any multimodal model with a ``decoder`` (:class:`DecoderLM`) and a config holding its
    ``decoder`` config works (MoE-LLaVA, Uni-MoE's progressive stage 3).
    """
    from zoo.models.decoder import DecoderLM  # here: the decoder module imports this one's helpers

    if not isinstance(getattr(model, "decoder", None), DecoderLM) or not hasattr(getattr(model, "config", None),
                                                                                "decoder"):
        raise TypeError(f"upcycle_multimodal_decoder takes a multimodal model with a zoo DecoderLM as .decoder, got "
                        f"{type(model).__name__}")
    dec = model.config.decoder
    if dec.moe is not None:
        raise ValueError("the model's decoder already has MoE layers; stage III upcycles the dense stage-II model")
    if (moe.activation, moe.expert_bias) != (dec.activation, dec.mlp_bias):
        raise ValueError(f"moe.activation={moe.activation!r} / expert_bias={moe.expert_bias} differ from the dense "
                         f"FFN's activation={dec.activation!r} / mlp_bias={dec.mlp_bias}: experts are copies of it")
    routing = {f.name: getattr(moe, f.name) for f in fields(MoEConfig)
               if f.name not in ("num_experts", "top_k", "activation", "expert_bias")}
    new = copy.deepcopy(model)
    upcycle(new.decoder, num_experts=moe.num_experts, top_k=moe.top_k, moe_layers=placement, inplace=True, **routing)
    new.config = replace(model.config, decoder=new.decoder.config)
    return new
