"""The shared MoE library: routers decide, dispatchers move tokens, experts compute, one ``MoELayer``."""

from zoo.moe.config import MoEConfig
from zoo.moe.dispatch import loop_dispatch, sorted_dispatch
from zoo.moe.experts import StackedExperts, apply_activation
from zoo.moe.layer import MoEAux, MoELayer, RoutingStats, collect_moe_aux, moe_layers, set_eval_overrides
from zoo.moe.routing import ExpertChoiceRouter, Routing, SoftRouter, TopKRouter, assign_positions, compute_capacity

__all__ = [
    "MoEConfig", "MoELayer", "MoEAux", "RoutingStats", "StackedExperts", "TopKRouter", "ExpertChoiceRouter",
    "SoftRouter", "Routing", "compute_capacity", "assign_positions", "loop_dispatch", "sorted_dispatch",
    "apply_activation", "collect_moe_aux", "moe_layers", "set_eval_overrides",
]
