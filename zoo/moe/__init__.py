"""The shared MoE library: routers decide, experts compute, one ``MoELayer`` composes them.

    config.py    MoEConfig: routing, capacity, losses, shared experts, dispatch
    routing.py   routers (top-k, expert choice, Soft MoE): a decision as a Routing
    experts.py   the Experts seam dispatchers call; StackedExperts (fused-kernel layout)
    dispatch.py  reference dispatchers: loop (the ground truth, also reference_moe) and sorted
    stats.py     auxiliary losses' composition, RoutingStats, MoEAux, RoutingRecord
    layer.py     MoELayer and routed_moe (decision -> experts -> losses/statistics, one compiled graph)
    compiled.py  torch.compile / CUDA graphs for that graph
"""

from zoo.layers.activations import apply_activation
from zoo.moe.config import MoEConfig
from zoo.moe.dispatch import loop_dispatch, reference_moe, sorted_dispatch
from zoo.moe.experts import Experts, LoRAExperts, StackedExperts, StackedWeights
from zoo.moe.layer import MoELayer, collect_moe_aux, moe_layers, routing_statistics_off, set_eval_overrides
from zoo.moe.routing import (ExpertChoiceRouter, Routing, RoutingPlan, SoftRouter, TopKRouter, assign_positions,
                             compute_capacity)
from zoo.moe.stats import MoEAux, RoutingRecord, RoutingStats

__all__ = [
    "MoEConfig", "MoELayer", "MoEAux", "routing_statistics_off", "RoutingStats", "RoutingRecord", "Experts", "LoRAExperts", "StackedExperts",
    "StackedWeights", "TopKRouter", "ExpertChoiceRouter", "SoftRouter", "Routing", "RoutingPlan", "compute_capacity",
    "assign_positions", "loop_dispatch", "reference_moe", "sorted_dispatch", "apply_activation", "collect_moe_aux",
    "moe_layers", "set_eval_overrides",
]
