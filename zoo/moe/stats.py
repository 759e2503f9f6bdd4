"""What an MoE layer reports besides its output: the auxiliary losses, the routing statistics and (on request) a
record of the routing itself. Functions of the config and tensors, so that ``torch.compile`` takes them whole inside
the layer's one graph (:func:`zoo.moe.layer.routed_moe`).

    MoEAux        loss (weighted sum, differentiable), losses (each, detached), stats
    RoutingStats  per-expert token counts, drops, importance, per-modality rows, top-1 expert, capacity
    RoutingRecord the routing decision per token, ungrouped to the caller's batch (``MoELayer.record_routing``)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from zoo.moe import losses as L
from zoo.moe.config import MoEConfig
from zoo.moe.routing import Routing


@dataclass
class RoutingStats:
    """What one MoE layer did with one batch (all detached; some may share memory, e.g. the per-modality rows
    with the totals: read them, do not modify them in place).

    tokens_per_expert [E]: kept (token, expert) assignments per expert.
    dropped_fraction: fraction of valid token slots dropped by capacity (0 when dropless).
    importance [E]: summed clean router probability per expert over valid tokens, normalised to sum 1.
    tokens_per_expert_by_modality [M, E], dropped_fraction_by_modality [M].
    top1_expert [B, S]: each token's highest-probability expert, -1 for masked tokens.
    capacity: C per group and expert, None when dropless.
    """

    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    importance: Tensor
    tokens_per_expert_by_modality: Tensor
    dropped_fraction_by_modality: Tensor
    top1_expert: Tensor
    capacity: Optional[int]


@dataclass
class MoEAux:
    """``loss``: the weighted sum of the auxiliary losses (differentiable); ``losses``: each loss's value,
    detached (for logging); ``stats``: :class:`RoutingStats`."""

    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: Optional[RoutingStats] = None


@dataclass
class RoutingRecord:
    """One forward's routing, for reports (``MoELayer.record_routing = True``; all detached copies, in the caller's
    batch layout, padding sequences of a partial group removed).

    probs [B, S, E]: clean (noise-free) router probabilities, float32 (Soft MoE: the slot probabilities summed per
    expert). valid [B, S] bool: the token was routed (not masked). modality [B, S] long or None.
    expert_index [B, S, K] long: each slot's expert (K = top-k; expert choice: K = E, slot e is expert e).
    keep [B, S, K] bool: the slot was dispatched (within capacity). Soft MoE has no slots: both None.
    """

    probs: Tensor
    valid: Tensor
    modality: Optional[Tensor]
    expert_index: Optional[Tensor]
    keep: Optional[Tensor]


def sparse_aux(r: Routing, cfg: MoEConfig, vg: Tensor, mg: Optional[Tensor], all_valid: bool) -> MoEAux:
    """Losses and statistics of one token-choice / expert-choice routing ``r`` of groups ``vg`` [G, S] (valid
    tokens) with modality ids ``mg`` [G, S] or None; ``all_valid``: ``vg`` is known to be all True. A function of
    the config and tensors, so that ``torch.compile`` takes it whole (:mod:`zoo.moe.compiled`)."""
    losses: dict[str, Tensor] = {}
    weighted = []
    mask = None if all_valid else vg  # V-MoE's losses and the top-k statistics skip an all-True mask

    # The per-loss values are for logging, detached: the gradient flows through the weighted total. (A compiled
    # graph output that requires grad but gets none costs a zero-filled tangent in every backward.)
    def add(name: str, weight: float, value: Tensor) -> None:
        losses[name] = value.detach()
        weighted.append(weight * value)

    # Importance and load losses end in the same reductions ((std/mean)^2 per group, mean over groups):
    # computed on their stacked per-group values at once. The importance loss's masked probabilities
    # are also the importance statistic's.
    balance: list[tuple[str, float, Tensor]] = []  # (name, weight, per-group values [G, E])
    masked_probs = None
    if cfg.importance_loss_weight > 0:
        importance, masked_probs = L.importance_per_group(r.clean_probs, mask)
        balance.append(("importance_loss", cfg.importance_loss_weight, importance))
    # The load loss needs noise (training only, as V-MoE) and top-k.
    if cfg.load_loss_weight > 0 and r.noise_std > 0 and cfg.router == "topk":
        load = L.load_per_group(r.logits, r.noisy_logits, r.noise_std, r.top_k, mask)
        balance.append(("load_loss", cfg.load_loss_weight, load))
    if balance:
        values = L.balance_losses([per_group for _, _, per_group in balance], mask)  # [n]
        weights = [weight for _, weight, _ in balance]
        for (name, _, _), value in zip(balance, values.detach().unbind()):
            losses[name] = value
        if len(set(weights)) == 1:  # V-MoE's equal weights: one product for all, the same numbers
            weighted.append(values * weights[0])
        else:
            weighted.extend(weight * value for weight, value in zip(weights, values.unbind()))
    if cfg.switch_loss_weight > 0:
        add("switch_loss", cfg.switch_loss_weight, L.switch_loss(r.probs, r.expert_index, vg))
    if cfg.z_loss_weight > 0:
        add("z_loss", cfg.z_loss_weight, L.z_loss(r.logits, vg))
    local_w, global_w = cfg.by_modality("local_entropy_weight"), cfg.by_modality("global_entropy_weight")
    min_experts = cfg.by_modality("global_entropy_min_experts")
    if max(local_w) > 0 or max(global_w) > 0:
        # Without modality ids every token counts as modality 0.
        probs = r.clean_probs.reshape(-1, r.clean_probs.shape[-1])
        flat_valid = vg.reshape(-1)
        sels = [flat_valid] if mg is None else [flat_valid & (mg.reshape(-1) == m) for m in range(len(local_w))]
        for m, sel in enumerate(sels):
            if local_w[m] > 0:
                add(f"local_entropy_m{m}", local_w[m], L.local_entropy_loss(probs, sel))
            if global_w[m] > 0:
                add(f"global_entropy_m{m}", global_w[m], L.global_entropy_loss(probs, sel, min_experts[m]))
    if cfg.target_expert_loss_weight > 0:
        targets = torch.tensor(cfg.target_expert_matrix(), device=r.clean_probs.device)
        add("target_expert_loss", cfg.target_expert_loss_weight,
            L.target_expert_loss(r.clean_probs, vg, mg, targets))
    if cfg.cross_modality_kl_weight > 0:
        if mg is None:
            raise ValueError("cross_modality_kl_weight > 0 needs modality ids: call the MoE layer with modality=[B, S]")
        pairs = torch.tensor(cfg.kl_pairs(), dtype=torch.long, device=r.clean_probs.device)
        add("cross_modality_kl_loss", cfg.cross_modality_kl_weight,
            L.cross_modality_kl_loss(r.clean_probs, vg, mg, pairs, cfg.num_modalities))
    total = _sum_terms(weighted) if weighted else r.logits.new_zeros(())
    with torch.no_grad():
        if masked_probs is None:
            masked_probs = r.clean_probs if mask is None else r.clean_probs * mask.unsqueeze(-1)
        if r.expert_demand is not None and mg is None:
            stats = _topk_stats(cfg, r, mask, masked_probs)
        else:
            E = cfg.num_experts
            # A comparison, not F.one_hot: one_hot checks the index range with a host read on CPU.
            experts = torch.arange(E, device=r.expert_index.device)
            onehot_kept = (r.expert_index.unsqueeze(-1) == experts) & r.keep.unsqueeze(-1)  # [G, S, K, E]
            per_token = onehot_kept.sum(2).float()  # [G, S, E]
            stats = _routing_stats(cfg, per_token.sum((0, 1)), masked_probs, r.clean_probs, vg, mg, r.keep,
                                       per_token, r.capacity)
    return MoEAux(loss=total, losses=losses, stats=stats)

def _topk_stats(cfg: MoEConfig, r: Routing, mask: Optional[Tensor], masked_probs: Tensor) -> RoutingStats:
    """Statistics of top-k routing without modality ids, from the router's per-expert demand: no per-token
    one-hot. Every valid token is modality 0, so row 0 of the per-modality values is the total. ``mask``
    [G, S] or None (every token valid)."""
    M, E = cfg.num_modalities, cfg.num_experts
    demand = r.expert_demand  # [G, E]
    kept = demand if r.capacity is None else demand.clamp_max(r.capacity)  # the first C of them are kept
    tokens_per_expert = kept.sum(0, dtype=torch.float32)  # [E]
    slots = demand.sum()  # every valid token's k slots
    if mask is None and r.expert_index.numel() > 0:  # slots > 0
        dropped = 1 - tokens_per_expert.sum() / slots
        dropped_by_mod = dropped.unsqueeze(0)
    else:
        dropped = 1 - tokens_per_expert.sum() / slots.clamp_min(1)
        dropped_by_mod = (dropped * (slots > 0)).unsqueeze(0)  # a modality without slots drops nothing: 0, not 1
    by_mod = tokens_per_expert.unsqueeze(0)  # [1, E]
    if M > 1:  # the other modalities have no tokens
        by_mod = torch.cat([by_mod, by_mod.new_zeros(M - 1, E)])
        dropped_by_mod = torch.cat([dropped_by_mod, dropped_by_mod.new_zeros(M - 1)])
    return RoutingStats(tokens_per_expert, dropped, _importance_share(masked_probs), by_mod, dropped_by_mod,
                        _top1(r.clean_probs, mask), r.capacity)

def _routing_stats(cfg: MoEConfig, tokens_per_expert: Tensor, masked_probs: Tensor, clean_probs: Tensor,
                   vg: Tensor, mg: Optional[Tensor], keep: Optional[Tensor], per_token: Optional[Tensor],
                   capacity: Optional[int]) -> RoutingStats:
    """Statistics from per-token kept counts ``per_token`` [G, S, E] (None for soft routing);
    ``masked_probs`` [G, S, E] are the clean probabilities zeroed at masked tokens."""
    M, E = cfg.num_modalities, cfg.num_experts
    mods = torch.zeros_like(vg, dtype=torch.long) if mg is None else mg
    # [G, S, M] one-hot of each valid token's modality; ids outside [0, M) belong to none. Everything below
    # stays on the device: no host sync in the forward pass.
    sel = (vg.unsqueeze(-1) & (mods.unsqueeze(-1) == torch.arange(M, device=vg.device))).float()
    if keep is not None:
        K = keep.shape[-1]
        # Products summed elementwise, not einsum: bookkeeping should not launch (or count as) GEMMs.
        by_mod = (sel.unsqueeze(-1) * per_token.unsqueeze(-2)).sum((0, 1))  # [M, E]
        # Expert choice has K = E slots of which only some are ever meant to be used: no "drops".
        if cfg.router == "topk":
            slots = vg.sum() * K
            dropped = 1 - keep.sum() / slots.clamp_min(1)
            kept_by_mod = (sel * keep.sum(-1, keepdim=True).float()).sum((0, 1))
            slots_by_mod = sel.sum((0, 1)) * K
            dropped_by_mod = torch.where(slots_by_mod > 0, 1 - kept_by_mod / slots_by_mod.clamp_min(1),
                                         torch.zeros_like(slots_by_mod))
        else:
            dropped = torch.zeros((), device=vg.device)
            dropped_by_mod = torch.zeros(M, device=vg.device)
    else:
        dropped = torch.zeros((), device=vg.device)
        dropped_by_mod = torch.zeros(M, device=vg.device)
        by_mod = torch.zeros(M, E, device=vg.device)
        by_mod[0] = tokens_per_expert
    return RoutingStats(tokens_per_expert.float(), dropped.float(), _importance_share(masked_probs), by_mod,
                        dropped_by_mod, _top1(clean_probs, vg), capacity)


def _sum_terms(terms: list[Tensor]) -> Tensor:
    """The sum of the weighted losses, 0-dim or [n] tensors, in the order given: the same additions as summing
    them all stacked, with as few kernels as the case allows."""
    if len(terms) == 1:
        return terms[0] if terms[0].ndim == 0 else terms[0].sum()
    if len(terms) == 2 and terms[0].ndim == terms[1].ndim == 0:
        return terms[0] + terms[1]
    return torch.cat([term.reshape(-1) for term in terms]).sum()


def _importance_share(masked_probs: Tensor) -> Tensor:
    """Summed clean probability per expert over the valid tokens [E] (fp32), normalised to sum 1."""
    importance = masked_probs.float().sum((0, 1))
    return importance / importance.sum().clamp_min(1e-12)


def _top1(clean_probs: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Each token's highest-probability expert [G, S], -1 for masked tokens (``mask`` None: none)."""
    top1 = clean_probs.argmax(-1)
    return top1 if mask is None else torch.where(mask, top1, -1)


def soft_aux(cfg: MoEConfig, dispatch: Tensor, logits: Tensor, vg: Tensor, mg: Optional[Tensor]) -> MoEAux:
    """Statistics of one Soft MoE routing (no auxiliary loss): ``dispatch`` [G, S, E*P] token-to-slot weights,
    ``logits`` [G, S, E*P], ``vg`` [G, S] valid tokens, ``mg`` [G, S] modality ids or None."""
    G, S, _ = dispatch.shape
    E = cfg.num_experts
    with torch.no_grad():
        load = dispatch.reshape(G, S, E, -1).sum(dim=(0, 1, 3))  # token mass per expert [E]
        probs = soft_expert_probs(logits, E)
        stats = _routing_stats(cfg, load, probs * vg.unsqueeze(-1), probs, vg, mg, None, None, None)
    return MoEAux(loss=dispatch.new_zeros((), dtype=torch.float32), losses={}, stats=stats)


def soft_expert_probs(logits: Tensor, num_experts: int) -> Tensor:
    """Soft MoE's per-expert routing probabilities [G, S, E]: the softmax over slots summed per expert."""
    G, S, _ = logits.shape
    return torch.softmax(logits, dim=-1).reshape(G, S, num_experts, -1).sum(-1)
