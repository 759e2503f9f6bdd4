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
    """What one MoE layer did with one batch (all detached).

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
    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: Optional[RoutingStats] = None


def _fused_moe_or_none(x: Tensor, activation: str):
    if not x.is_cuda or activation not in ("gelu_tanh", "swiglu"):
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
                                     config.capacity_multiple_of, config.capacity_from_valid_tokens)
        elif config.router == "expert_choice":
            self.router = ExpertChoiceRouter(dim, E, config.noise_std, config.capacity_multiple_of,
                                             config.capacity_from_valid_tokens)
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
        (xg, vg, mg), pad = self._group(x, valid, modality)
        if self.config.router == "soft":
            yg = self._soft_forward(xg, vg, mg)
        else:
            yg = self._sparse_forward(xg, vg, mg)
        y = yg.reshape(B + pad, S, self.dim)[:B]
        if self.aux is not None and self.aux.stats is not None:  # documented as [B, S]: ungroup, drop padding
            self.aux.stats.top1_expert = self.aux.stats.top1_expert.reshape(B + pad, S)[:B]
        return y

    def _sparse_forward(self, xg: Tensor, vg: Tensor, mg: Optional[Tensor]) -> Tensor:
        cfg = self.config
        G, Sg, D = xg.shape
        routing: Routing = self.router(xg, vg, cfg.k(self.training), cfg.capacity_setting(self.training))
        K = routing.expert_index.shape[-1]
        flat = (xg.reshape(G * Sg, D), routing.expert_index.reshape(-1, K),
                routing.combine_weight.reshape(-1, K).to(xg.dtype), routing.keep.reshape(-1, K))
        y = self._dispatch(*flat)
        self.aux = self._sparse_aux(routing, vg, mg)
        return y.reshape(G, Sg, D)

    def _dispatch(self, x: Tensor, expert_index: Tensor, combine_weight: Tensor, keep: Tensor) -> Tensor:
        if getattr(self, "expert_dispatcher", None) is not None:  # expert parallelism (zoo.distributed)
            return self.expert_dispatcher(x, expert_index, combine_weight, keep, self.experts)
        mode = self.config.dispatch
        if mode in ("auto", "fused"):
            fused = _fused_moe_or_none(x, self.config.activation)
            if fused is not None:
                e = self.experts
                return fused(x, expert_index, combine_weight, keep, e.w1, e.b1, e.w2, e.b2, self.config.activation)
            if mode == "fused":
                raise RuntimeError(
                    "dispatch='fused' needs a CUDA tensor, Triton and activation 'gelu_tanh' or 'swiglu'; "
                    f"got device={x.device}, dtype={x.dtype}, activation={self.config.activation!r}. "
                    "Use dispatch='auto' to fall back to the reference path.")
            mode = "sorted"
        return DISPATCHERS[mode](x, expert_index, combine_weight, keep, self.experts)

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
            stats = self._stats(load, probs, vg, mg, None, None, None)
        self.aux = MoEAux(loss=xg.new_zeros((), dtype=torch.float32), losses={}, stats=stats)
        return y

    # ---------------------------------------------------------------------------------- losses, stats
    def _sparse_aux(self, r: Routing, vg: Tensor, mg: Optional[Tensor]) -> MoEAux:
        cfg = self.config
        losses: dict[str, Tensor] = {}
        weighted = []

        def add(name: str, weight: float, fn) -> None:
            if weight > 0:
                value = fn()
                losses[name] = value
                weighted.append(weight * value)

        add("importance_loss", cfg.importance_loss_weight, lambda: L.importance_loss(r.clean_probs, vg))
        if r.noise_std > 0 and cfg.router == "topk":  # needs noise (training only, as V-MoE) and top-k
            add("load_loss", cfg.load_loss_weight,
                lambda: L.load_loss(r.logits, r.noisy_logits, r.noise_std, r.top_k, vg))
        add("switch_loss", cfg.switch_loss_weight, lambda: L.switch_loss(r.probs, r.expert_index, vg))
        add("z_loss", cfg.z_loss_weight, lambda: L.z_loss(r.logits, vg))
        local_w, global_w = cfg.by_modality("local_entropy_weight"), cfg.by_modality("global_entropy_weight")
        min_experts = cfg.by_modality("global_entropy_min_experts")
        if max(local_w) > 0 or max(global_w) > 0:
            # Without modality ids every token counts as modality 0.
            probs = r.clean_probs.reshape(-1, r.clean_probs.shape[-1])
            flat_valid = vg.reshape(-1)
            sels = [flat_valid] if mg is None else [flat_valid & (mg.reshape(-1) == m) for m in range(len(local_w))]
            for m, sel in enumerate(sels):
                if local_w[m] > 0:
                    losses[f"local_entropy_m{m}"] = v = L.local_entropy_loss(probs, sel)
                    weighted.append(local_w[m] * v)
                if global_w[m] > 0:
                    losses[f"global_entropy_m{m}"] = v = L.global_entropy_loss(probs, sel, min_experts[m])
                    weighted.append(global_w[m] * v)
        total = torch.stack(weighted).sum() if weighted else r.logits.new_zeros(())
        with torch.no_grad():
            E = cfg.num_experts
            # A comparison, not F.one_hot: one_hot checks the index range with a host read on CPU.
            experts = torch.arange(E, device=r.expert_index.device)
            onehot_kept = (r.expert_index.unsqueeze(-1) == experts) & r.keep.unsqueeze(-1)  # [G, S, K, E]
            per_token = onehot_kept.sum(2).float()  # [G, S, E]
            stats = self._stats(per_token.sum((0, 1)), r.clean_probs, vg, mg, r.keep, per_token, r.capacity)
        return MoEAux(loss=total, losses=losses, stats=stats)

    def _stats(self, tokens_per_expert: Tensor, clean_probs: Tensor, vg: Tensor, mg: Optional[Tensor],
               keep: Optional[Tensor], per_token: Optional[Tensor], capacity: Optional[int]) -> RoutingStats:
        M, E = self.config.num_modalities, self.config.num_experts
        v = vg.unsqueeze(-1).float()
        importance = (clean_probs.float() * v).sum((0, 1))
        importance = importance / importance.sum().clamp_min(1e-12)
        top1 = torch.where(vg, clean_probs.argmax(-1), torch.full_like(vg, -1, dtype=torch.long))
        mods = torch.zeros_like(vg, dtype=torch.long) if mg is None else mg
        # [G, S, M] one-hot of each valid token's modality; ids outside [0, M) belong to none. Everything below
        # stays on the device: no host sync in the forward pass.
        sel = (vg.unsqueeze(-1) & (mods.unsqueeze(-1) == torch.arange(M, device=vg.device))).float()
        if keep is not None:
            K = keep.shape[-1]
            # Products summed elementwise, not einsum: bookkeeping should not launch (or count as) GEMMs.
            by_mod = (sel.unsqueeze(-1) * per_token.unsqueeze(-2)).sum((0, 1))  # [M, E]
            # Expert choice has K = E slots of which only some are ever meant to be used: no "drops".
            if self.config.router == "topk":
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
        return RoutingStats(tokens_per_expert.float(), dropped.float(), importance, by_mod, dropped_by_mod,
                            top1, capacity)


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
    """Change eval-time routing of every MoE layer (V-MoE evaluates with other capacity factors / k)."""
    for layer in moe_layers(model):
        changes = {}
        if capacity_factor is not None:
            changes["eval_capacity_factor"] = capacity_factor
        if top_k is not None:
            changes["eval_top_k"] = top_k
        if dropless is not None:
            changes["eval_dropless"] = dropless
        layer.config = replace(layer.config, **changes)  # validates via __post_init__
