"""Training tasks (LightningModules) and the pieces the command-line tools share."""

from zoo.tasks.base import ZooTask, moe_layer_names
from zoo.tasks.classification import ImageClassificationTask
from zoo.tasks.routing_report import RoutingReport, RoutingSummary
from zoo.tasks.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups, split_decay_params

__all__ = [
    "ImageClassificationTask", "RoutingReport", "RoutingSummary", "ZooTask", "moe_layer_names", "build_optimizer", "build_scheduler",
    "lr_multiplier", "param_groups", "split_decay_params",
]
