"""The one MoE layer every model family uses: group tokens, route, dispatch to experts, combine.

    x [B, S, D] --group--> [G, S_g, D] --router--> Routing --dispatcher--> experts --> y [B, S, D]

A dropped or masked token's output is 0 (the residual connection carries it). After each forward the
layer holds ``self.aux`` (:class:`MoEAux`): the weighted auxiliary loss, each loss's value and the routing
statistics, which models collect with :func:`collect_moe_aux`. Keeping them on the layer (rather than in
the return value) lets an MoE layer replace any ``mlp(x)`` call, e.g. inside a timm ``Block``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import Tensor, nn

from zoo.moe import losses as L
from zoo.moe.config import MoEConfig
from zoo.moe.dispatch import DISPATCHERS
from zoo.moe.experts import StackedExperts
from zoo.moe.routing import ExpertChoiceRouter, Routing, SoftRouter, TopKRouter


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


def _fused_moe_or_none(x: Tensor, activation: str):
    """``zoo.kernels.fused_moe`` where it runs on ``x`` (CUDA, or CPU under TRITON_INTERPRET=1) and supports
    ``activation``, else None."""
    if activation not in ("gelu_tanh", "swiglu"):
        return None
    try:
        from zoo.kernels import fused_moe, fused_moe_available
    except ImportError:
        return None
    return fused_moe if fused_moe_available(x) else None


class MoELayer(nn.Module):
    """Mixture-of-Experts MLP.

    Args:
        dim: D, the token width.
        hidden_dim: H, each expert's hidden width.
        config: routing, capacity, losses and dispatch settings (:class:`MoEConfig`).
    """

    def __init__(self, dim: int, hidden_dim: int, config: MoEConfig) -> None:
        super().__init__()
        self.dim, self.hidden_dim, self.config = dim, hidden_dim, config
        E = config.num_experts
        if config.router == "topk":
            self.router = TopKRouter(dim, E, config.noise_std, config.renormalize, config.batch_priority,
                                     config.capacity_multiple_of, config.capacity_from_valid_tokens,
                                     config.compile_routing, config.cuda_graphs)
        elif config.router == "expert_choice":
            self.router = ExpertChoiceRouter(dim, E, config.noise_std, config.capacity_multiple_of,
                                             config.capacity_from_valid_tokens, config.compile_routing,
                                             config.cuda_graphs)
        elif config.router == "soft":
            self.router = SoftRouter(dim, E, config.slots_per_expert)
        else:
            raise ValueError(f"unknown router {config.router!r}; expected 'topk', 'expert_choice' or 'soft'")
        self.experts = StackedExperts(E, dim, hidden_dim, config.activation, config.expert_bias)
        self.aux: Optional[MoEAux] = None
        # Expert parallelism hook (set by zoo.distributed.shard_experts): a callable with the dispatcher
        # signature that sends tokens to experts sharded across ranks. None = all experts are local.
        self.expert_dispatcher = None

    # ----------------------------------------------------------------------------------------- grouping
    def _group(self, x: Tensor, valid: Tensor, modality: Optional[Tensor]):
        """[B, S, ...] -> [G, group_size * S, ...], padding the batch with invalid sequences."""
        B, S, D = x.shape
        gs = self.config.group_size or B
        gs = min(gs, B)
        pad = (-B) % gs
        if pad:
            x = torch.cat([x, x.new_zeros(pad, S, D)])
            valid = torch.cat([valid, valid.new_zeros(pad, S)])
            if modality is not None:
                modality = torch.cat([modality, modality.new_zeros(pad, S)])
        G = (B + pad) // gs
        grouped = (x.reshape(G, gs * S, D), valid.reshape(G, gs * S),
                   None if modality is None else modality.reshape(G, gs * S))
        return grouped, pad

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor, mask: Optional[Tensor] = None, modality: Optional[Tensor] = None) -> Tensor:
        """``x`` [B, S, D]; ``mask`` [B, S] bool, True = real token (default: all); ``modality`` [B, S]
        ids in [0, num_modalities). Returns [B, S, D]."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MoELayer expects x of shape [B, S, D={self.dim}], got {tuple(x.shape)}")
        B, S, _ = x.shape
        valid = torch.ones(B, S, dtype=torch.bool, device=x.device) if mask is None else mask.to(torch.bool)
        if valid.shape != (B, S):
            raise ValueError(f"mask must have shape [B, S] = {(B, S)}, got {tuple(valid.shape)}")
        if modality is not None and modality.shape != (B, S):
            raise ValueError(f"modality must have shape [B, S] = {(B, S)}, got {tuple(modality.shape)}")
        # Drop the last step's outputs first: on the CUDA-graph path their memory is reused once nothing holds them.
        self.aux = None
        (xg, vg, mg), pad = self._group(x, valid, modality)
        # No mask and no padding: every token is valid, so the top-k router, V-MoE's losses and the statistics
        # skip their masking kernels (images are never masked).
        all_valid = mask is None and pad == 0
        if self.config.router == "soft":
            yg = self._soft_forward(xg, vg, mg)
        else:
            yg = self._sparse_forward(xg, vg, mg, all_valid)
        y = yg.reshape(B + pad, S, self.dim)[:B]
        if self.aux is not None and self.aux.stats is not None:  # documented as [B, S]: ungroup, drop padding
            self.aux.stats.top1_expert = self.aux.stats.top1_expert.reshape(B + pad, S)[:B]
        return y

    def _sparse_forward(self, xg: Tensor, vg: Tensor, mg: Optional[Tensor], all_valid: bool) -> Tensor:
        cfg = self.config
        G, Sg, D = xg.shape
        x = xg.reshape(G * Sg, D)
        fused = self._fused_experts(x)
        experts = None if fused is None else (fused, x, self.experts.w1, self.experts.b1, self.experts.w2,
                                              self.experts.b2)
        # The losses and statistics, and on the fused path the experts, are computed from the routing inside the
        # router's compiled graph (one compiled call, one CUDA graph replay per layer).
        routing: Routing = self.router(xg, vg, cfg.k(self.training), cfg.capacity_setting(self.training),
                                       all_valid=all_valid, then=(routed_tail, (cfg, vg, mg, all_valid, experts)))
        self.aux, out = routing.aux
        if experts is None:  # out: the combine weights, for a dispatcher outside the graph
            K = routing.expert_index.shape[-1]
            out = self._dispatch(x, routing.expert_index.reshape(-1, K), out.reshape(-1, K).to(xg.dtype),
                                 routing.keep.reshape(-1, K))
        return out.reshape(G, Sg, D)

    def _fused_experts(self, x: Tensor):
        """The fused expert function when this call takes the fused GPU path (dispatch "auto"/"fused", no expert
        parallelism hook, a device and activation it supports), else None."""
        if getattr(self, "expert_dispatcher", None) is not None or self.config.dispatch not in ("auto", "fused"):
            return None
        fused = _fused_moe_or_none(x, self.config.activation)
        if fused is None and self.config.dispatch == "fused":
            raise RuntimeError(
                "dispatch='fused' needs a CUDA tensor, Triton and activation 'gelu_tanh' or 'swiglu'; "
                f"got device={x.device}, dtype={x.dtype}, activation={self.config.activation!r}. "
                "Use dispatch='auto' to fall back to the reference path.")
        return fused

    def _dispatch(self, x: Tensor, expert_index: Tensor, combine_weight: Tensor, keep: Tensor) -> Tensor:
        """The experts outside the routing graph: the expert parallelism hook, or a reference dispatcher."""
        if getattr(self, "expert_dispatcher", None) is not None:  # expert parallelism (zoo.distributed)
            return self.expert_dispatcher(x, expert_index, combine_weight, keep, self.experts)
        mode = self.config.dispatch
        return DISPATCHERS["sorted" if mode in ("auto", "fused") else mode](x, expert_index, combine_weight, keep,
                                                                            self.experts)

    def _soft_forward(self, xg: Tensor, vg: Tensor, mg: Optional[Tensor]) -> Tensor:
        G, Sg, D = xg.shape
        E, P = self.config.num_experts, self.config.slots_per_expert
        dispatch, combine, logits = self.router(xg, vg)  # [G, S, E*P]
        slots = torch.einsum("gsn,gsd->gnd", dispatch.to(xg.dtype), xg)  # [G, E*P, D]
        slots = slots.reshape(G, E, P, D).permute(1, 0, 2, 3).reshape(E, G * P, D)
        out = self.experts.forward_dense(slots).reshape(E, G, P, D).permute(1, 0, 2, 3).reshape(G, E * P, D)
        y = torch.einsum("gsn,gnd->gsd", combine.to(out.dtype), out)
        with torch.no_grad():
            load = dispatch.reshape(G, Sg, E, P).sum(dim=(0, 1, 3))  # token mass per expert [E]
            probs = torch.softmax(logits, dim=-1).reshape(G, Sg, E, P).sum(-1)
            stats = _routing_stats(self.config, load, probs * vg.unsqueeze(-1), probs, vg, mg, None, None, None)
        self.aux = MoEAux(loss=xg.new_zeros((), dtype=torch.float32), losses={}, stats=stats)
        return y


def routed_tail(r: Routing, cfg: MoEConfig, vg: Tensor, mg: Optional[Tensor], all_valid: bool,
                experts: Optional[tuple]) -> tuple[MoEAux, Tensor]:
    """What the MoE layer computes from a routing ``r`` inside the router's compiled graph: ``(aux, out)``.

    ``experts`` = (fused_moe, x [T, D], w1, b1, w2, b2) on the fused path: ``out`` is the expert output [T, D]
    (T = G * S). None: ``out`` is the differentiable combine weights [G, S, K], for a dispatcher outside the graph.
    """
    aux = sparse_aux(r, cfg, vg, mg, all_valid)
    if experts is None:
        return aux, r.combine_weight
    fused, x, w1, b1, w2, b2 = experts
    K = r.expert_index.shape[-1]
    y = fused(x, r.expert_index.reshape(-1, K), r.combine_weight.reshape(-1, K).to(x.dtype), r.keep.reshape(-1, K),
              w1, b1, w2, b2, cfg.activation)
    return aux, y


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


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of a model in forward (registration) order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def collect_moe_aux(model: nn.Module) -> tuple[Tensor, dict[str, Tensor], list[RoutingStats]]:
    """Sum the aux losses of every MoE layer that ran in the last forward.

    Returns (weighted total, {loss name: sum over layers}, [stats per MoE layer]).
    """
    total, losses, stats = None, {}, []
    for layer in moe_layers(model):
        if layer.aux is None:
            continue
        total = layer.aux.loss if total is None else total + layer.aux.loss
        for k, v in layer.aux.losses.items():
            losses[k] = v if k not in losses else losses[k] + v
        stats.append(layer.aux.stats)
    if total is None:  # no MoE layer ran: a zero on the model's device (a CPU scalar would need a copy per step)
        param = next(model.parameters(), None)
        total = torch.zeros((), device=None if param is None else param.device)
    return total, losses, stats


def set_eval_overrides(model: nn.Module, capacity_factor: Optional[float] = None, top_k: Optional[int] = None,
                       dropless: Optional[bool] = None) -> None:
    """Change eval-time routing of every MoE layer (V-MoE evaluates with other capacity factors / k).

    One source of truth: the values are written into the :class:`MoEConfig` objects themselves (each layer's, and
    those inside ``model.config``, which the layers share), so ``model.config`` shows them, ``save_pretrained``
    writes them to config.json and a model loaded from there routes the same way. All values are validated before
    anything changes. A config object shared with another model changes there too (build each model from its own
    config to keep them apart)."""
    import dataclasses

    changes = {k: v for k, v in (("eval_capacity_factor", capacity_factor), ("eval_top_k", top_k),
                                 ("eval_dropless", dropless)) if v is not None}
    if not changes:
        return
    found: dict[int, MoEConfig] = {}

    def collect(obj: object) -> None:  # the MoEConfig objects inside a (nested) config dataclass
        if isinstance(obj, MoEConfig):
            found.setdefault(id(obj), obj)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                collect(getattr(obj, f.name))

    collect(getattr(model, "config", None))
    for layer in moe_layers(model):
        collect(layer.config)
    for config in found.values():
        replace(config, **changes)  # validates via __post_init__ before anything is changed
    for config in found.values():
        for key, value in changes.items():
            setattr(config, key, value)
