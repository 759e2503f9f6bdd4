"""Routers: they decide which expert slot each token goes to; dispatchers (``dispatch.py``) move the data.

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
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def compute_capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float,
                     multiple_of: int = 4) -> int:
    """Per-group, per-expert buffer size: ``ceil(S * k * cf / E)`` rounded up to ``multiple_of``.

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
    return max(capacity, 1)


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
    ``capacity`` is C, or None when dropless.
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


def _router_logits(router: nn.Linear, x: Tensor) -> Tensor:
    # Routing decisions are made in fp32: bf16 logits tie and flip top-k choices between runs/paths.
    return F.linear(x.float(), router.weight.float(), None if router.bias is None else router.bias.float())


def _noisy(logits: Tensor, noise_std: float, num_experts: int, training: bool,
           generator: Optional[torch.Generator]) -> tuple[Tensor, float]:
    std = noise_std / num_experts
    if not training or std == 0.0:
        return logits, 0.0
    noise = torch.randn(logits.shape, device=logits.device, dtype=logits.dtype, generator=generator)
    return logits + std * noise, std


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
    G, S, K = expert_index.shape
    if priority is not None:
        order = torch.argsort(priority, dim=1, descending=True, stable=True)  # [G, S]
    else:
        order = torch.arange(S, device=expert_index.device).expand(G, S)
    # Slots in placement order: k-major, then token priority: [G, K*S].
    ordered_expert = torch.gather(expert_index, 1, order.unsqueeze(-1).expand(G, S, K))
    ordered_valid = torch.gather(valid, 1, order.unsqueeze(-1).expand(G, S, K))
    flat_expert = ordered_expert.transpose(1, 2).reshape(G, K * S)
    flat_valid = ordered_valid.transpose(1, 2).reshape(G, K * S)
    # Invalid slots go to a sentinel expert E so that they take no place among real experts.
    key = torch.where(flat_valid, flat_expert, torch.full_like(flat_expert, num_experts))
    # A stable sort by expert keeps placement order inside each expert: rank = place in its buffer.
    sorted_key, sort_idx = torch.sort(key, dim=1, stable=True)
    counts = torch.zeros(G, num_experts + 1, dtype=torch.long, device=key.device)
    counts.scatter_add_(1, key, torch.ones_like(key))
    starts = torch.cumsum(counts, dim=1) - counts  # [G, E+1]
    rank_sorted = torch.arange(K * S, device=key.device).expand(G, K * S) - torch.gather(starts, 1, sorted_key)
    flat_position = torch.empty_like(rank_sorted).scatter_(1, sort_idx, rank_sorted)
    flat_position = torch.where(flat_valid, flat_position, torch.full_like(flat_position, -1))
    ordered_position = flat_position.reshape(G, K, S).transpose(1, 2)  # [G, S, K] in priority order
    return torch.empty_like(ordered_position).scatter_(1, order.unsqueeze(-1).expand(G, S, K), ordered_position)


class TopKRouter(nn.Module):
    """Tokens choose experts: V-MoE's noisy top-k, optionally batch prioritized (BPR).

    Semantics follow V-MoE exactly: logits ``x W`` (no bias); in training, Gaussian noise of std
    ``noise_std / E`` is added; softmax over ALL experts, then top-k; combine weights are the chosen softmax
    probabilities, not renormalised (``renormalize=True`` gives the Mixtral / MoE-LLaVA behaviour). With
    BPR, tokens of a group are ordered by their top-1 weight and every top-1 choice is placed before any
    top-2 choice; slots past capacity are dropped. In eval mode routing is deterministic (no noise).
    """

    def __init__(self, dim: int, num_experts: int, noise_std: float = 1.0, renormalize: bool = False,
                 batch_priority: bool = True, capacity_multiple_of: int = 4,
                 capacity_from_valid_tokens: bool = False) -> None:
        super().__init__()
        self.capacity_from_valid_tokens = capacity_from_valid_tokens
        self.num_experts = num_experts
        self.noise_std = noise_std
        self.renormalize = renormalize
        self.batch_priority = batch_priority
        self.capacity_multiple_of = capacity_multiple_of
        self.proj = nn.Linear(dim, num_experts, bias=False)
        self.generator: Optional[torch.Generator] = None  # tests set one for reproducible noise

    def forward(self, x: Tensor, valid: Tensor, top_k: int, capacity_factor: Optional[float]) -> Routing:
        """Route ``x`` [G, S, D] with ``valid`` [G, S] bool; ``capacity_factor`` None means dropless."""
        G, S, _ = x.shape
        E = self.num_experts
        logits = _router_logits(self.proj, x)
        noisy_logits, std = _noisy(logits, self.noise_std, E, self.training, self.generator)
        clean_probs = torch.softmax(logits, dim=-1)
        probs = torch.softmax(noisy_logits, dim=-1) if std > 0 else clean_probs
        weight, expert_index = torch.topk(probs, top_k, dim=-1)  # [G, S, K], sorted descending
        if self.renormalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        slot_valid = valid.unsqueeze(-1).expand(G, S, top_k)
        priority = None
        if self.batch_priority:
            priority = torch.where(valid, weight[..., 0].detach(), torch.full_like(weight[..., 0], -1.0))
        position = assign_positions(expert_index, slot_valid, priority, E)
        if capacity_factor is None:
            capacity = None
            keep = slot_valid
        else:
            n = capacity_tokens(valid, self.capacity_from_valid_tokens)
            capacity = compute_capacity(n, E, top_k, capacity_factor, self.capacity_multiple_of)
            keep = slot_valid & (position < capacity)
        position = torch.where(keep, position, torch.full_like(position, -1))
        combine_weight = torch.where(keep, weight, torch.zeros_like(weight))
        return Routing(expert_index, combine_weight, keep, position, probs, clean_probs, logits,
                       noisy_logits, std, capacity, top_k)


class ExpertChoiceRouter(nn.Module):
    """Experts choose tokens (Zhou et al. 2022): each expert takes the top-C tokens of its group by
    router probability. Load is balanced by construction; a token may get 0..E experts.

    ``C = ceil(S * cf / E)`` (rounded up to ``capacity_multiple_of``, at most S): the capacity factor is the
    average number of experts per token. Masked tokens are never picked. Slot e of a token is expert e.
    """

    def __init__(self, dim: int, num_experts: int, noise_std: float = 0.0, capacity_multiple_of: int = 4,
                 capacity_from_valid_tokens: bool = False) -> None:
        super().__init__()
        self.capacity_from_valid_tokens = capacity_from_valid_tokens
        self.num_experts = num_experts
        self.noise_std = noise_std
        self.capacity_multiple_of = capacity_multiple_of
        self.proj = nn.Linear(dim, num_experts, bias=False)
        self.generator: Optional[torch.Generator] = None

    def forward(self, x: Tensor, valid: Tensor, top_k: int, capacity_factor: Optional[float]) -> Routing:
        G, S, _ = x.shape
        E = self.num_experts
        logits = _router_logits(self.proj, x)
        noisy_logits, std = _noisy(logits, self.noise_std, E, self.training, self.generator)
        clean_probs = torch.softmax(logits, dim=-1)
        probs = torch.softmax(noisy_logits, dim=-1) if std > 0 else clean_probs
        # Dropless expert choice means every expert may take every token: C = S.
        capacity = S if capacity_factor is None else min(
            S, compute_capacity(capacity_tokens(valid, self.capacity_from_valid_tokens), E, 1, capacity_factor,
                                self.capacity_multiple_of))
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
        return Routing(expert_index, combine_weight, keep, position, probs, clean_probs, logits,
                       noisy_logits, std, capacity, E)


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
        logits = torch.einsum("gsd,dn->gsn", F.normalize(x.float(), dim=-1),
                              F.normalize(self.slot_embed.float(), dim=0)) * self.scale
        masked = logits.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        dispatch = torch.softmax(masked, dim=1)
        # A group with no valid token would give NaN columns; make them 0 instead.
        dispatch = torch.nan_to_num(dispatch, nan=0.0)
        combine = torch.softmax(logits, dim=-1) * valid.unsqueeze(-1)
        return dispatch, combine, logits
