"""Where a training stage puts LoRA: a recipe's ``lora:`` block, applied to a built model, and its inverse (merge).

    lora: {experts: true, modules: [attention], r: 8, alpha: 16, dropout: 0.0}

- ``experts``: every MoE layer's stacked experts become :class:`zoo.moe.LoRAExperts` with PER-EXPERT frozen bases
  (:meth:`~zoo.moe.LoRAExperts.from_experts`): each expert keeps its own weights as its base (Uni-MoE v1 stage 3:
  the stage-2 FFN its expert file gave it) and gets its own low-rank deltas.
- ``modules``: ``nn.Linear`` layers wrapped in :class:`zoo.layers.LoRALinear`; each entry is either a freeze GROUP
  name of :mod:`zoo.models.freeze` (e.g. ``attention``: every ``nn.Linear`` whose weight is in that group) or a
  full module name as ``model.named_modules()`` lists it (e.g. ``decoder.blocks.0.attn.q_proj``). A group name
  wins over a module of the same name; a group or name that yields no ``nn.Linear`` is an error.
- ``r`` / ``alpha``: rank and scale (``alpha / r``); ``dropout``: LoRA input dropout of the wrapped linears only
  (the experts' deltas are merged into their weights for the fused path, which has no dropout).

The low-rank factors form the ``lora`` freeze group (models that define it, e.g. Uni-MoE), so a recipe trains them
with ``trainable: [routers, lora]``; the frozen bases stay in their own groups (``experts``, ``attention``, ...).
Every LoRA ``B`` starts at zero: the wrapped model computes exactly what it computed before. :func:`merge_all_lora`
folds everything back into plain layers for inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from torch import nn


@dataclass(frozen=True)
class LoRASpec:
    experts: bool = False
    modules: tuple[str, ...] = field(default_factory=tuple)
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, spec: Optional[Mapping[str, Any]]) -> Optional["LoRASpec"]:
        """A recipe's ``lora:`` mapping (None / empty -> None); unknown keys and empty specs are errors."""
        if not spec:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"lora: unknown key(s) {unknown}; the keys are {sorted(known)}")
        modules = spec.get("modules") or ()
        if isinstance(modules, str):
            raise TypeError(f"lora.modules must be a list, got the string {modules!r}; write [{modules!r}]")
        out = cls(experts=bool(spec.get("experts", False)), modules=tuple(str(m) for m in modules),
                  r=int(spec.get("r", 8)), alpha=float(spec.get("alpha", 16.0)),
                  dropout=float(spec.get("dropout", 0.0)))
        if not out.experts and not out.modules:
            raise ValueError("lora: neither experts: true nor any modules; nothing would get LoRA (drop the block)")
        if out.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {out.r}")
        return out

    def linear_names(self, model: nn.Module) -> list[str]:
        """The full names of the ``nn.Linear`` modules ``modules`` selects (groups expanded), in model order."""
        from zoo.models.freeze import param_groups

        groups = param_groups(model) if self.modules else {}
        chosen: set[str] = set()
        for entry in self.modules:
            if entry in groups:
                ids = {id(p) for _, p in groups[entry]}
                found = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) in ids]
                if not found:
                    raise ValueError(f"lora.modules: group {entry!r} has no nn.Linear in {type(model).__name__}")
                chosen.update(found)
            else:
                chosen.add(entry)  # a module name: apply_lora checks it is an nn.Linear
        return [n for n, _ in model.named_modules() if n in chosen] + sorted(
            n for n in chosen if n not in dict(model.named_modules()))

    def apply(self, model: nn.Module) -> dict[str, list[str]]:
        """Wrap ``model`` in place; returns ``{"experts": [MoE layer names], "modules": [linear names]}``. Linears are
        chosen BEFORE the experts are wrapped (a group is read from the model as given)."""
        from zoo.layers.lora import apply_lora
        from zoo.moe import MoELayer, StackedExperts
        from zoo.moe.experts import LoRAExperts

        names = self.linear_names(model)
        layers: list[str] = []
        if self.experts:
            for name, layer in model.named_modules():
                if isinstance(layer, MoELayer):
                    if not isinstance(layer.experts, StackedExperts):
                        raise TypeError(f"lora.experts: {name} has experts of type {type(layer.experts).__name__}; "
                                        "only stacked experts get per-expert LoRA")
                    layer.experts = LoRAExperts.from_experts(layer.experts, r=self.r, alpha=self.alpha)
                    layers.append(name)
            if not layers:
                raise ValueError("lora.experts: the model has no MoE layers (upcycle it first)")
        if names:
            apply_lora(model, names, r=self.r, alpha=self.alpha, dropout=self.dropout)
        return {"experts": layers, "modules": names}


def lora_parameter_names(model: nn.Module) -> set[str]:
    """The names (``named_parameters``) of every LoRA factor in ``model`` (LoRA linears and LoRA experts)."""
    from zoo.layers.lora import LoRALinear
    from zoo.moe.experts import LoRAExperts

    factors = {id(p) for m in model.modules() if isinstance(m, (LoRALinear, LoRAExperts)) for p in m.lora_parameters()}
    return {n for n, p in model.named_parameters() if id(p) in factors}


def merge_all_lora(model: nn.Module) -> int:
    """Fold every LoRA linear into an ``nn.Linear`` and every MoE layer's LoRA experts into
    :class:`zoo.moe.StackedExperts`, in place (inference: same outputs, no LoRA matmuls); returns how many."""
    from zoo.layers.lora import merge_lora
    from zoo.moe import MoELayer
    from zoo.moe.experts import LoRAExperts

    n = merge_lora(model)
    for layer in model.modules():
        if isinstance(layer, MoELayer) and isinstance(layer.experts, LoRAExperts):
            layer.experts = layer.experts.merged()
            n += 1
    return n


__all__ = ["LoRASpec", "lora_parameter_names", "merge_all_lora"]
