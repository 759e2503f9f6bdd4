"""Freeze specs: which parameters a training stage trains, named by parameter GROUP, never by name substring.

A group is found from the model's structure (module types and which attribute of which module holds a parameter),
so a renamed attribute or a new backbone cannot silently move a parameter between groups, and every parameter
belongs to exactly one group (:func:`param_groups` refuses a model with a parameter no rule claims).

Default groups (:data:`DEFAULT_RULES`, earlier rules win, so a tower's attention stays in ``vision_tower``):

- ``vision_tower``: every parameter of a :class:`~zoo.models.towers.VisionTower`;
- ``projector``: of a :class:`~zoo.models.connectors.Projector`;
- ``routers``: an :class:`~zoo.moe.MoELayer`'s ``router`` (and ``shared_expert_gate``, a gate too);
- ``experts``: the rest of an MoE layer (routed experts, shared experts);
- ``dense_ffn``: a dense :class:`~zoo.layers.Mlp`;
- ``attention``: a :class:`~zoo.layers.decoder_attention.DecoderAttention` (with its q/k norms);
- ``norms``: LayerNorm / RMSNorm;
- ``embeddings``: ``nn.Embedding`` (a tied LM head's matrix is the embedding's, so it is here);
- ``lm_head``: a :class:`~zoo.models.decoder.DecoderLM`'s ``lm_head``.

A model adds groups by defining ``param_group_rules() -> list[GroupRule]``; they come BEFORE the defaults (Uni-MoE:
``audio_tower``, ``audio_connector``, and ``lora`` claiming only the low-rank factors of LoRA layers, whose frozen
base weights stay in their own group).

MoE-Tuning (Lin et al. 2024, MoE-LLaVA) stages, :data:`MOE_TUNING_STAGES`: I trains the projector; II the projector
and the whole (dense) language model; III, after :func:`zoo.models.upcycle.upcycle_multimodal_decoder`, the MoE
layers only (experts and routers), as the paper says. The official script selects stage III's parameters by
substring (``--train_modules gate_proj up_proj down_proj wg`` for StableLM), which also matches the dense FFNs of the
non-MoE blocks, and its later vision-module setup turns the projector's gradients back on: it trains more than the
paper's stage III. The zoo trains what the paper says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class GroupRule:
    """``name``: the group; ``claims(module)``: the rule applies to this module; ``params(module)``: which of its
    parameters (recursively) it claims (default: all). Parameters already claimed by an earlier rule stay there."""

    name: str
    claims: Callable[[nn.Module], bool]
    params: Optional[Callable[[nn.Module], Iterable[nn.Parameter]]] = None

    def claimed(self, module: nn.Module) -> Iterable[nn.Parameter]:
        return module.parameters() if self.params is None else self.params(module)


def _moe_gate_params(layer: nn.Module) -> list[nn.Parameter]:
    params = list(layer.router.parameters())
    if layer.shared_expert_gate is not None:
        params += list(layer.shared_expert_gate.parameters())
    return params


def _default_rules() -> list[GroupRule]:
    # Imported here: freeze specs serve every family and must not make the model modules import each other.
    from zoo.layers.decoder_attention import DecoderAttention
    from zoo.layers.lora import LoRALinear
    from zoo.layers.mlp import Mlp
    from zoo.layers.norm import RMSNorm
    from zoo.models.connectors import Projector
    from zoo.models.decoder import DecoderLM
    from zoo.models.towers import VisionTower
    from zoo.moe import LoRAExperts, MoELayer

    return [
        # first: the low-rank factors of LoRA layers / LoRA experts (their frozen bases stay in their own groups)
        GroupRule("lora", lambda m: isinstance(m, (LoRALinear, LoRAExperts)), lambda m: m.lora_parameters()),
        GroupRule("vision_tower", lambda m: isinstance(m, VisionTower)),
        GroupRule("projector", lambda m: isinstance(m, Projector)),
        GroupRule("routers", lambda m: isinstance(m, MoELayer), _moe_gate_params),
        GroupRule("experts", lambda m: isinstance(m, MoELayer)),
        GroupRule("dense_ffn", lambda m: isinstance(m, Mlp)),
        GroupRule("attention", lambda m: isinstance(m, DecoderAttention)),
        GroupRule("norms", lambda m: isinstance(m, (nn.LayerNorm, RMSNorm, nn.GroupNorm))),
        GroupRule("embeddings", lambda m: isinstance(m, nn.Embedding)),
        GroupRule("lm_head", lambda m: isinstance(m, DecoderLM), lambda m: m.lm_head.parameters()),
    ]


DEFAULT_GROUPS = ("lora", "vision_tower", "projector", "routers", "experts", "dense_ffn", "attention", "norms", "embeddings",
                  "lm_head")

MOE_TUNING_STAGES: dict[int, tuple[str, ...]] = {
    1: ("projector",),
    2: ("projector", "embeddings", "attention", "norms", "dense_ffn", "lm_head"),
    3: ("experts", "routers"),
}


def moe_tuning_stage(stage: int) -> tuple[str, ...]:
    """The trainable groups of MoE-Tuning stage 1, 2 or 3 (:data:`MOE_TUNING_STAGES`)."""
    if stage not in MOE_TUNING_STAGES:
        raise ValueError(f"MoE-Tuning has stages 1, 2 and 3, got {stage!r}")
    return MOE_TUNING_STAGES[stage]


def group_rules(model: nn.Module) -> list[GroupRule]:
    """The model's own rules (``model.param_group_rules()``, if it has them) followed by :func:`_default_rules`."""
    own = getattr(model, "param_group_rules", None)
    return (list(own()) if callable(own) else []) + _default_rules()


def param_groups(model: nn.Module, rules: Optional[Sequence[GroupRule]] = None) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{group: [(parameter name, parameter), ...]}`` for every group of ``rules`` (default
    :func:`group_rules`), in rule order; a group this model lacks maps to ``[]``.

    Raises:
        ValueError: a parameter that no rule claims (named), so nothing is trained or frozen by accident.
    """
    rules = group_rules(model) if rules is None else list(rules)
    names = [r.name for r in rules]
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in names}
    owner: dict[int, str] = {}
    for rule in rules:
        for module in model.modules():
            if rule.claims(module):
                for p in rule.claimed(module):
                    owner.setdefault(id(p), rule.name)
    unclaimed = []
    for name, p in model.named_parameters():
        group = owner.get(id(p))
        if group is None:
            unclaimed.append(name)
        else:
            groups[group].append((name, p))
    if unclaimed:
        raise ValueError(f"{len(unclaimed)} parameter(s) belong to no freeze group: {unclaimed[:8]}; the groups are "
                         f"{names}. Give the model a param_group_rules() method with a GroupRule for them")
    return groups


def apply_freeze(model: nn.Module, trainable: Sequence[str],
                 rules: Optional[Sequence[GroupRule]] = None) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Train exactly the parameters of the ``trainable`` groups (``requires_grad = True``) and freeze every other
    parameter. Returns :func:`param_groups`.

    Raises:
        ValueError: an unknown group name (the message lists the known ones), or a named group with no parameters in
            this model (e.g. ``experts`` on a dense model: upcycle it first), which would train nothing.
    """
    if isinstance(trainable, str):
        raise TypeError(f"trainable must be a list of group names, got the string {trainable!r}; write [{trainable!r}]")
    groups = param_groups(model, rules)
    unknown = [g for g in trainable if g not in groups]
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown}; known groups: {list(groups)}")
    empty = [g for g in trainable if not groups[g]]
    if empty:
        raise ValueError(f"group(s) {empty} have no parameters in this {type(model).__name__} (a dense model has no "
                         "experts / routers: upcycle it first); nothing of them can be trained")
    chosen = set(trainable)
    for group, params in groups.items():
        for _, p in params:
            p.requires_grad_(group in chosen)
    return groups


def trainable_counts(model: nn.Module, rules: Optional[Sequence[GroupRule]] = None) -> dict[str, tuple[int, int]]:
    """``{group: (trainable elements, frozen elements)}`` for every group of the model's rules."""
    return {group: (sum(p.numel() for _, p in params if p.requires_grad),
                    sum(p.numel() for _, p in params if not p.requires_grad))
            for group, params in param_groups(model, rules).items()}


def trainable_table(model: nn.Module, rules: Optional[Sequence[GroupRule]] = None) -> str:
    """A text table of trainable and frozen parameter counts per group and in total (printed before step 1)."""
    counts = trainable_counts(model, rules)
    rows = [(g, t, f) for g, (t, f) in counts.items()]
    total_t, total_f = sum(t for _, t, _ in rows), sum(f for _, _, f in rows)
    width = max(len(g) for g in [*counts, "total"])
    lines = [f"{'group':<{width}}  {'trainable':>13}  {'frozen':>13}",
             f"{'-' * width}  {'-' * 13}  {'-' * 13}"]
    lines += [f"{g:<{width}}  {t:>13,}  {f:>13,}" for g, t, f in rows]
    lines += [f"{'-' * width}  {'-' * 13}  {'-' * 13}", f"{'total':<{width}}  {total_t:>13,}  {total_f:>13,}"]
    return "\n".join(lines)


def run_tower(tower: nn.Module, *args: Any, call: Optional[Callable[..., Any]] = None) -> Any:
    """``tower(*args)`` (or ``call(*args)``, a method of the tower), recording the autograd graph only when some
    tower parameter trains: a frozen tower (the recipes' default) then keeps no activations for backward, which is
    most of a multimodal step's memory."""
    trains = torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())
    with torch.set_grad_enabled(trains):
        return (tower if call is None else call)(*args)

