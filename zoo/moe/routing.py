"""Routers: they decide which expert slot each token goes to; dispatchers (``dispatch.py``) move the data.

A router only decides. ``router.plan(x, valid, k, capacity_factor, ...)`` does the eager part of a decision (draws
the router noise, computes the capacity) and returns a :class:`RoutingPlan`: a pure function of tensors and its
arguments, which the MoE layer calls inside its one compiled graph (:func:`zoo.moe.layer.routed_moe`);
``router(...)`` runs the plan at once and returns the :class:`Routing`; the layer calls ``router(..., decided=routing)``
with the routing its graph made, so forward hooks on a router see every decision.

Every sparse router returns a :class:`Routing` in one token-choice format over groups, so one set of
dispatchers (and the fused GPU kernel) serves top-k, batch-prioritised top-k and expert-choice routing:

    expert_index   [G, S, K]  long   expert of each of a token's K slots
    combine_weight [G, S, K]  float  weight of the expert's output; 0 where the slot was dropped or masked
    keep           [G, S, K]  bool   the slot is dispatched (valid token, within capacity)
    position       [G, S, K]  long   place in the expert's per-group buffer (V-MoE order), -1 if not kept

G groups of S tokens, E experts, K slots per token (k for top-k; E for expert choice, where slot e means
"expert e", kept if expert e picked the token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn



def compute_capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float,
                     multiple_of: int = 4, min_capacity: int = 0) -> int:
    """Per-group, per-expert buffer size: ``ceil(S * k * cf / E)`` rounded up to ``multiple_of``, at least
    ``min_capacity`` (and 1).

    >>> compute_capacity(400, 8, 2, 1.05)
    108
    """
    if group_size < 1 or num_experts < 1 or top_k < 1:
        raise ValueError(f"group_size, num_experts and top_k must be >= 1, got {group_size}, {num_experts}, {top_k}")
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    # Round before ceil so that e.g. 400*2*1.05/8 = 105.00000000000001 does not become 106.
    capacity = math.ceil(round(group_size * top_k * capacity_factor / num_experts, 9))
    if multiple_of and multiple_of > 1:
        capacity += (-capacity) % multiple_of
    return max(capacity, min_capacity, 1)


def deepspeed_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int = 0) -> int:
    """DeepSpeed 0.9.5's top-2 capacity: ``ceil(T / E * (2 * cf))`` computed in float32 as DeepSpeed computes it
    (a Python float times a float32 tensor), at least ``min_capacity`` (and 1: an expert buffer of 0 slots would
    drop every token; DeepSpeed's own minimum is ``min_capacity``).

    >>> deepspeed_capacity(10, 3, 1.05)  # float32: 6.9999995 -> 7 (float64 would give 7.000000000000001 -> 8)
    7
    """
    if num_tokens < 1 or num_experts < 1:
        raise ValueError(f"num_tokens and num_experts must be >= 1, got {num_tokens}, {num_experts}")
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    product = np.float32(num_tokens / num_experts) * np.float32(capacity_factor * 2)
    return max(math.ceil(float(product)), min_capacity, 1)


def capacity_tokens(valid: Tensor, from_valid: bool) -> int:
    """The token count capacity is computed from: the group length S, or (``from_valid``) the number of
    valid tokens of the fullest group, so that padding neither takes nor adds capacity (at least 1)."""
    if not from_valid:
        return valid.shape[1]
    return max(int(valid.sum(dim=1).max().item()), 1) if valid.numel() else 1


@dataclass
class Routing:
    """A router's decision for G groups of S tokens (see the module docstring for the slot format).

    ``probs`` [G, S, E] are the probabilities the decision used (noisy in training); ``clean_probs`` are
    the noise-free softmax (importance and entropy losses); ``logits``/``noisy_logits`` are pre-softmax.
    ``capacity`` is C, or None when dropless. ``expert_demand`` [G, E] long counts the valid slots that chose each
    expert in each group, before capacity (the first C of them are kept), where the router gets it for free
    (top-k); else None.
    """

    expert_index: Tensor
    combine_weight: Tensor
    keep: Tensor
    position: Tensor
    probs: Tensor
    clean_probs: Tensor
    logits: Tensor
    noisy_logits: Tensor
    noise_std: float
    capacity: Optional[int]
    top_k: int
    expert_demand: Optional[Tensor] = None

    def detached(self) -> "Routing":
        """This routing with its float tensors detached (index and mask tensors carry no gradient anyway)."""
        return Routing(self.expert_index, self.combine_weight.detach(), self.keep, self.position, self.probs.detach(),
                       self.clean_probs.detach(), self.logits.detach(), self.noisy_logits.detach(), self.noise_std,
                       self.capacity, self.top_k, self.expert_demand)


class RoutingPlan(NamedTuple):
    """A decision ready to run: ``decide(*args) -> Routing``. ``decide`` is a module-level pure function (one compiled
    graph serves every layer); ``args`` hold the router's parameters, the drawn noise and the capacity."""

    decide: Callable[..., Routing]
    args: tuple

    def run(self) -> Routing:
        return self.decide(*self.args)


def _router_logits(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    # Routing decisions are made in fp32: bf16 logits tie and flip top-k choices between runs/paths. Autocast is
    # turned off here, or it would cast this matmul back to bf16 under mixed-precision training.
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def _router_noise(shape: tuple[int, int, int], noise_std: float, training: bool, device: torch.device,
                  generator: Optional[torch.Generator]) -> tuple[Optional[Tensor], float]:
    """Standard-normal noise [G, S, E] for the router logits and its scale ``noise_std / E``; (None, 0.0) in eval
    or without noise. Drawn on its own (not inside :func:`topk_decide`), so compiled and eager routing see the
    same numbers."""
    std = noise_std / shape[-1]
    if not training or std == 0.0:
        return None, 0.0
    return torch.randn(shape, device=device, dtype=torch.float32, generator=generator), std


def buffer_ranks(expert_index: Tensor, valid: Optional[Tensor], priority: Optional[Tensor],
                 num_experts: int, position_major: bool = False) -> tuple[Tensor, Tensor]:
    """1-based place of each (token, slot) in its expert's per-group buffer (V-MoE order, see
    :func:`assign_positions`; ``position_major``: token order, every slot of token t before any slot of token t+1,
    which a causal layer needs) and how many valid slots ask for each expert.

    A running count over a one-hot of the slots in placement order (as V-MoE computes it) instead of a
    counting sort: half the kernels, and the count's last row is the per-expert demand.

    Args:
        expert_index: [G, S, K] chosen expert per slot, in [0, E).
        valid: [G, S, K] bool, slots that compete for capacity; None = all.
        priority: [G, S] or None (token order); must be None with ``position_major``.
    Returns:
        rank [G, S, K] long: 1-based place among the valid slots of the same expert; meaningless for invalid slots.
        demand [G, E] long: number of valid slots per expert and group (before any capacity limit).
    """
    G, S, K = expert_index.shape
    if position_major:
        if priority is not None:
            raise ValueError("position-major buffer order has no priority (batch priority reorders tokens)")
        # Slots in placement order, token-major: [G, 1, S*K] as laid out.
        flat = expert_index.reshape(G, 1, S * K)
        onehot = flat == torch.arange(num_experts, device=expert_index.device).view(1, num_experts, 1)
        if valid is not None:
            onehot.bitwise_and_(valid.reshape(G, 1, S * K))
        count = onehot.cumsum(-1)
        return count.gather(1, flat).view(G, S, K), count[..., -1]
    # Slots in placement order, k-major then token priority: [G, K, S].
    ordered_expert = expert_index.transpose(1, 2)
    ordered_valid = None if valid is None else valid.transpose(1, 2)
    order = None
    if priority is not None:
        order = torch.sort(priority, dim=1, descending=True, stable=True).indices  # [G, S]
        by_priority = order.unsqueeze(1).expand(G, K, S)
        ordered_expert = ordered_expert.gather(2, by_priority)  # contiguous [G, K, S]
        if ordered_valid is not None:
            ordered_valid = ordered_valid.gather(2, by_priority)
    else:
        ordered_expert = ordered_expert.contiguous()
    # Memory: the running count is int64 [G, E, K*S] (E=128, k=8 and 32K tokens in one group: 268 MB). No
    # dispatcher reads positions; a dropless layer that needs the memory could skip them.
    # [G, E, K*S] one-hot of each valid slot's expert, slots last: the running count is then an innermost-dim
    # scan (on CUDA a scan along a middle dim runs one thread per column, far slower).
    ordered_expert = ordered_expert.view(G, 1, K * S)
    onehot = ordered_expert == torch.arange(num_experts, device=expert_index.device).view(1, num_experts, 1)
    if ordered_valid is not None:
        onehot.view(G, num_experts, K, S).bitwise_and_(ordered_valid.unsqueeze(1))
    count = onehot.cumsum(-1)  # valid slots of each expert so far, this one included
    ordered_rank = count.gather(1, ordered_expert).view(G, K, S)
    demand = count[..., -1]  # [G, E]
    if order is None:
        return ordered_rank.transpose(1, 2).contiguous(), demand
    # Back to token order ([G, S, K], contiguous like every other Routing tensor).
    rank = torch.empty_like(expert_index).scatter_(1, order.unsqueeze(-1).expand(G, S, K),
                                                   ordered_rank.transpose(1, 2))
    return rank, demand


def assign_positions(expert_index: Tensor, valid: Tensor, priority: Optional[Tensor], num_experts: int) -> Tensor:
    """Place each (token, slot) in its expert's buffer, V-MoE order, per group.

    All slot-0 (top-1) choices are placed before any slot-1 choice, and so on; within a slot, tokens go in
    ``priority`` order (descending, stable; batch prioritized routing) or in token order when None.
    Invalid (masked) slots take no place.

    Args:
        expert_index: [G, S, K] chosen expert per slot.
        valid: [G, S, K] bool, slots that compete for capacity.
        priority: [G, S] or None.
    Returns:
        position [G, S, K] long: 0-based place in the expert's buffer, -1 for invalid slots.
    """
    rank, _ = buffer_ranks(expert_index, valid, priority, num_experts)
    return torch.where(valid, rank - 1, -1)


class TopKRouter(nn.Module):
    """Tokens choose experts: V-MoE's noisy top-k, optionally batch prioritized (BPR).

    Semantics follow V-MoE exactly: logits ``x W`` (no bias); in training, Gaussian noise of std
    ``noise_std / E`` is added; softmax over ALL experts, then top-k; combine weights are the chosen softmax
    probabilities, not renormalised (``renormalize=True`` gives the Mixtral / MoE-LLaVA behaviour). With
    BPR, tokens of a group are ordered by their top-1 weight and every top-1 choice is placed before any
    top-2 choice; slots past capacity are dropped. In eval mode routing is deterministic (no noise).

    ``causal=True`` (a causal layer; each group is one sequence): capacity is filled in position order, every choice
    of token t before any choice of token t+1, and batch priority does not apply, so no later token changes an
    earlier token's decision.

    The decision (:func:`topk_route`, ~25 small kernels forward and backward) is a pure function that the MoE layer
    runs inside its one compiled graph (:mod:`zoo.moe.compiled`); the noise is drawn outside it (:meth:`plan`), so
    compiled and eager routing see the same numbers.
    """

    def __init__(self, dim: int, num_experts: int, noise_std: float = 1.0, renormalize: bool = False,
                 batch_priority: bool = True, capacity_multiple_of: int = 4,
                 capacity_from_valid_tokens: bool = False, min_capacity: int = 0,
                 deepspeed_top2_gating: str = "off") -> None:
        super().__init__()
        if deepspeed_top2_gating not in ("off", "argmax", "gumbel"):
            raise ValueError(f"deepspeed_top2_gating must be 'off', 'argmax' or 'gumbel', got {deepspeed_top2_gating!r}")
        self.deepspeed_top2_gating = deepspeed_top2_gating
        self.min_capacity = min_capacity
        self.capacity_from_valid_tokens = capacity_from_valid_tokens
        self.num_experts = num_experts
        self.noise_std = noise_std
        self.renormalize = renormalize
        self.batch_priority = batch_priority
        self.capacity_multiple_of = capacity_multiple_of
        self.proj = nn.Linear(dim, num_experts, bias=False)
        self.generator: Optional[torch.Generator] = None  # tests set one for reproducible noise

    def plan(self, x: Tensor, valid: Tensor, top_k: int, capacity_factor: Optional[float],
             all_valid: bool = False, causal: bool = False) -> RoutingPlan:
        """The decision for ``x`` [G, S, D] with ``valid`` [G, S] bool; ``capacity_factor`` None means dropless.
        ``all_valid=True`` promises that ``valid`` is all True (no mask): the masking kernels are skipped."""
        G, S, _ = x.shape
        E = self.num_experts
        if self.deepspeed_top2_gating != "off":
            return self._deepspeed_plan(x, valid, top_k, capacity_factor, all_valid, causal)
        noise, std = _router_noise((G, S, E), self.noise_std, self.training, x.device, self.generator)
        capacity = None
        if capacity_factor is not None:
            n = S if all_valid else capacity_tokens(valid, self.capacity_from_valid_tokens)
            capacity = compute_capacity(n, E, top_k, capacity_factor, self.capacity_multiple_of, self.min_capacity)
        return RoutingPlan(topk_route, (x, self.proj.weight, self.proj.bias, noise, std, valid, all_valid, top_k,
                                        capacity, self.renormalize, self.batch_priority and not causal, causal))

    def _deepspeed_plan(self, x: Tensor, valid: Tensor, top_k: int, capacity_factor: Optional[float],
                        all_valid: bool, causal: bool) -> RoutingPlan:
        """The plan of ``deepspeed_top2_gating`` (:func:`deepspeed_top2_route`): Gumbel noise drawn here, in training
        and eval ("gumbel"), capacity over all tokens of each group (the layer makes the whole call one group)."""
        G, S, _ = x.shape
        E = self.num_experts
        if top_k != 2:
            raise ValueError(f"deepspeed_top2_gating={self.deepspeed_top2_gating!r} routes every token to 2 experts, "
                             f"got top_k={top_k}")
        if causal and capacity_factor is not None:
            raise ValueError(
                f"deepspeed_top2_gating={self.deepspeed_top2_gating!r} with a capacity is not causal: DeepSpeed's "
                "capacity is shared by all tokens of the call, so later tokens (and other sequences) take earlier "
                "tokens' slots. Make the layer dropless (dropless=True, eval_dropless None or True) to use it in a "
                "causal layer.")
        gumbel = None
        if self.deepspeed_top2_gating == "gumbel":
            gumbel = gumbel_noise((G, S, E), x.device, self.generator)
        capacity = None
        if capacity_factor is not None:
            n = S if all_valid else capacity_tokens(valid, self.capacity_from_valid_tokens)
            capacity = deepspeed_capacity(n, E, capacity_factor, self.min_capacity)
        return RoutingPlan(deepspeed_top2_route, (x, self.proj.weight, self.proj.bias, gumbel, valid, all_valid,
                                                  capacity))

    def forward(self, x: Tensor, valid: Tensor, top_k: int, capacity_factor: Optional[float],
                all_valid: bool = False, causal: bool = False, decided: Optional[Routing] = None) -> Routing:
        """:meth:`plan`, run at once. ``decided``: a routing already made from this router's plan (the MoE layer runs
        plans inside its compiled graph and then calls the router with the result), returned as is, so that forward
        hooks on the router see every decision with its inputs."""
        return decided if decided is not None else self.plan(x, valid, top_k, capacity_factor, all_valid, causal).run()


def topk_route(x: Tensor, weight: Tensor, bias: Optional[Tensor], noise: Optional[Tensor], noise_std: float,
               valid: Tensor, all_valid: bool, top_k: int, capacity: Optional[int], renormalize: bool,
               batch_priority: bool, position_major: bool = False) -> Routing:
    """:func:`topk_decide` as a :class:`Routing`."""
    out = topk_decide(x, weight, bias, noise, noise_std, valid, all_valid, top_k, capacity, renormalize,
                      batch_priority, position_major)
    return Routing(*out[:8], noise_std, capacity, top_k, out[8])


def topk_decide(x: Tensor, weight: Tensor, bias: Optional[Tensor], noise: Optional[Tensor], noise_std: float,
                valid: Tensor, all_valid: bool, top_k: int, capacity: Optional[int], renormalize: bool,
                batch_priority: bool, position_major: bool = False) -> tuple[Tensor, ...]:
    """:class:`TopKRouter`'s decision as a function of tensors (``torch.compile`` takes it whole).

    ``x`` [G, S, D], router ``weight`` [E, D], ``noise`` [G, S, E] standard normal (None: no noise) scaled by
    ``noise_std``, ``valid`` [G, S], ``capacity`` C or None (dropless), ``position_major``: capacity filled in token
    order across k (causal; no batch priority). Returns the :class:`Routing` fields expert_index, combine_weight,
    keep, position, probs, clean_probs, logits, noisy_logits, expert_demand."""
    G, S, _ = x.shape
    E = weight.shape[0]
    logits = _router_logits(x, weight, bias)
    noisy_logits = logits if noise is None else logits + noise_std * noise
    clean_probs = torch.softmax(logits, dim=-1)
    probs = clean_probs if noise is None else torch.softmax(noisy_logits, dim=-1)
    combine, expert_index = torch.topk(probs, top_k, dim=-1)  # [G, S, K], sorted descending
    if renormalize:
        combine = combine / combine.sum(dim=-1, keepdim=True)
    slot_valid = valid.unsqueeze(-1).expand(G, S, top_k)
    priority = None
    if batch_priority:
        priority = combine[..., 0].detach()
        if not all_valid:  # masked tokens last (weights are >= 0)
            priority = torch.where(valid, priority, -1.0)
    rank, demand = buffer_ranks(expert_index, None if all_valid else slot_valid, priority, E, position_major)
    if capacity is None:
        keep = slot_valid
    else:
        keep = rank <= capacity
        if not all_valid:
            keep = keep & slot_valid
    # Products with the 0/1 mask, not where(): the same numbers (ranks are integers, weights finite
    # probabilities) without a scalar tensor per fill value.
    position = rank * keep - 1
    return expert_index, combine * keep, keep, position, probs, clean_probs, logits, noisy_logits, demand


def gumbel_uniform(shape: tuple[int, ...], device: torch.device, generator: Optional[torch.Generator]) -> Tensor:
    """Uniform draws in ``[tiny, 1 - eps]`` (float32), the support ``torch.distributions.Gumbel`` samples from (as
    DeepSpeed's ``gumbel_rsample`` does): ``tiny + U[0, 1) * (1 - eps - tiny)``."""
    info = torch.finfo(torch.float32)
    u = torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    return info.tiny + u * (1 - info.eps - info.tiny)


def gumbel_noise(shape: tuple[int, ...], device: torch.device, generator: Optional[torch.Generator]) -> Tensor:
    """Standard Gumbel noise ``-log(-log(u))`` from :func:`gumbel_uniform` draws (finite: u is in (0, 1))."""
    return -torch.log(-torch.log(gumbel_uniform(shape, device, generator)))


def deepspeed_top2_route(x: Tensor, weight: Tensor, bias: Optional[Tensor], gumbel: Optional[Tensor], valid: Tensor,
                         all_valid: bool, capacity: Optional[int]) -> Routing:
    """DeepSpeed 0.9.5's ``top2gating`` (as MoE-LLaVA ran it) as a :class:`Routing` over G groups of S tokens; a pure
    function of tensors (``torch.compile`` takes it whole, like :func:`topk_route`).

    ``x`` [G, S, D], router ``weight`` [E, D], ``gumbel`` [G, S, E] standard Gumbel noise or None, ``valid`` [G, S],
    ``capacity`` C or None (dropless). Per token: gates = softmax of the fp32 logits; expert 1 = argmax of the gates;
    expert 2 = argmax of ``logits + gumbel`` with expert 1 excluded. Per group: every valid token's first choice is
    placed (token order) before any second choice, slots past C are dropped; the kept gates are divided by their
    sum (clamped at float32 eps), so a token whose other slot was dropped gets weight 1. ``probs`` and
    ``clean_probs`` are the gates (the noise only picks expert 2), ``noise_std`` is 0 (no load loss)."""
    G, S, _ = x.shape
    E = weight.shape[0]
    logits = _router_logits(x, weight, bias)
    gates = torch.softmax(logits, dim=-1)
    first = gates.argmax(dim=-1, keepdim=True)  # [G, S, 1]
    scores = logits if gumbel is None else logits + gumbel
    second = scores.scatter(-1, first, float("-inf")).argmax(dim=-1, keepdim=True)
    expert_index = torch.cat([first, second], dim=-1)  # [G, S, 2]
    slot_valid = valid.unsqueeze(-1).expand(G, S, 2)
    rank, demand = buffer_ranks(expert_index, None if all_valid else slot_valid, None, E)
    keep = slot_valid if capacity is None else (rank <= capacity) & slot_valid
    kept = gates.gather(-1, expert_index) * keep
    combine = kept / kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).eps)
    position = rank * keep - 1
    return Routing(expert_index, combine, keep, position, gates, gates, logits, logits, 0.0, capacity, 2, demand)


class ExpertChoiceRouter(nn.Module):
    """Experts choose tokens (Zhou et al. 2022): each expert takes the top-C tokens of its group by
    router probability. Load is balanced by construction; a token may get 0..E experts.

    ``C = ceil(S * cf / E)`` (rounded up to ``capacity_multiple_of``, at most S): the capacity factor is the
    average number of experts per token. Masked tokens are never picked. Slot e of a token is expert e.
    Same calls as :class:`TopKRouter` (``top_k`` is ignored); not causal (an expert's choice of token t depends on
    every token of the group): ``causal=True`` raises.
    """

    def __init__(self, dim: int, num_experts: int, noise_std: float = 0.0, capacity_multiple_of: int = 4,
                 capacity_from_valid_tokens: bool = False, min_capacity: int = 0) -> None:
        super().__init__()
        self.min_capacity = min_capacity
        self.capacity_from_valid_tokens = capacity_from_valid_tokens
        self.num_experts = num_experts
        self.noise_std = noise_std
        self.capacity_multiple_of = capacity_multiple_of
        self.proj = nn.Linear(dim, num_experts, bias=False)
        self.generator: Optional[torch.Generator] = None

    def plan(self, x: Tensor, valid: Tensor, top_k: int, capacity_factor: Optional[float],
             all_valid: bool = False, causal: bool = False) -> RoutingPlan:
        if causal:
            raise ValueError("expert-choice routing is not causal (each expert compares all tokens of a group); "
                             "use router='topk' in a causal model")
        G, S, _ = x.shape
        E = self.num_experts
        noise, std = _router_noise((G, S, E), self.noise_std, self.training, x.device, self.generator)
        # Dropless expert choice means every expert may take every token: C = S.
        capacity = S if capacity_factor is None else min(
            S, compute_capacity(capacity_tokens(valid, self.capacity_from_valid_tokens), E, 1, capacity_factor,
                                self.capacity_multiple_of, self.min_capacity))
        return RoutingPlan(expert_choice_route, (x, self.proj.weight, self.proj.bias, noise, std, valid, capacity))

    def forward(self, x: Tensor, valid: Tensor, top_k: int, capacity_factor: Optional[float],
                all_valid: bool = False, causal: bool = False, decided: Optional[Routing] = None) -> Routing:
        """As :meth:`TopKRouter.forward`."""
        return decided if decided is not None else self.plan(x, valid, top_k, capacity_factor, all_valid, causal).run()


def expert_choice_route(x: Tensor, weight: Tensor, bias: Optional[Tensor], noise: Optional[Tensor], noise_std: float,
                        valid: Tensor, capacity: int) -> Routing:
    """:class:`ExpertChoiceRouter`'s decision as a function of tensors: ``x`` [G, S, D], ``weight`` [E, D],
    ``noise`` [G, S, E] or None scaled by ``noise_std``, ``valid`` [G, S], each expert takes ``capacity`` tokens."""
    G, S, _ = x.shape
    E = weight.shape[0]
    logits = _router_logits(x, weight, bias)
    noisy_logits = logits if noise is None else logits + noise_std * noise
    clean_probs = torch.softmax(logits, dim=-1)
    probs = torch.softmax(noisy_logits, dim=-1) if noise is not None else clean_probs
    score = torch.where(valid.unsqueeze(-1), probs, torch.full_like(probs, -1.0))  # [G, S, E]
    top_score, top_token = torch.topk(score.transpose(1, 2), capacity, dim=-1)  # [G, E, C]
    picked = top_score >= 0  # masked tokens (score -1) are never taken
    keep = torch.zeros(G, E, S, dtype=torch.bool, device=x.device)
    keep.scatter_(2, top_token, picked)
    keep = keep.transpose(1, 2)  # [G, S, E]
    rank = torch.arange(capacity, device=x.device).expand(G, E, capacity)
    position = torch.full((G, E, S), -1, dtype=torch.long, device=x.device)
    position.scatter_(2, top_token, torch.where(picked, rank, torch.full_like(rank, -1)))
    position = position.transpose(1, 2)
    expert_index = torch.arange(E, device=x.device).expand(G, S, E)
    combine_weight = torch.where(keep, probs, torch.zeros_like(probs))
    return Routing(expert_index, combine_weight, keep, position, probs, clean_probs, logits, noisy_logits, noise_std,
                   capacity, E)


class SoftRouter(nn.Module):
    """Soft MoE (Puigcerver et al. 2023): every slot is a convex mix of all tokens of a group, every token
    output a convex mix of all slot outputs. No token is dropped; masked tokens get no dispatch weight.

    Returns dispatch weights [G, S, E*P] (softmax over tokens) and combine weights [G, S, E*P] (softmax
    over slots). Logits use L2-normalised tokens and slot parameters with a learned scale, as the paper
    recommends for stability at large width.
    """

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.slots_per_expert = slots_per_expert
        self.slot_embed = nn.Parameter(torch.randn(dim, num_experts * slots_per_expert) * dim**-0.5)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # fp32 weights, as the top-k routers' logits
            logits = torch.einsum("gsd,dn->gsn", F.normalize(x.float(), dim=-1),
                                  F.normalize(self.slot_embed.float(), dim=0)) * self.scale
        masked = logits.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        dispatch = torch.softmax(masked, dim=1)
        # A group with no valid token would give NaN columns; make them 0 instead.
        dispatch = torch.nan_to_num(dispatch, nan=0.0)
        combine = torch.softmax(logits, dim=-1) * valid.unsqueeze(-1)
        return dispatch, combine, logits
