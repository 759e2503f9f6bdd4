"""The one output type every zoo model returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

from zoo.moe.layer import RoutingStats


@dataclass
class ModelOutput:
    """``logits`` [B, num_classes] (or [B, S, V] for language models); ``aux_loss`` the weighted sum of
    every MoE layer's auxiliary losses (add it to the task loss); ``aux_losses`` each loss summed over
    layers (unweighted, for logging); ``routing`` one :class:`RoutingStats` per MoE layer in depth order;
    ``features`` the pooled pre-logits representation [B, D']; ``hidden_states`` the final tokens
    [B, S, D]."""

    logits: Optional[Tensor]
    aux_loss: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    routing: list[RoutingStats] = field(default_factory=list)
    features: Optional[Tensor] = None
    hidden_states: Optional[Tensor] = None
