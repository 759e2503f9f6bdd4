"""MoE Zoo: vision and multimodal Mixture-of-Experts models in PyTorch."""

from zoo import models  # noqa: F401  (registers the model families)
from zoo.config import ConfigError
from zoo.hub import from_pretrained, list_pretrained, push_to_hub, save_pretrained
from zoo.moe import MoEConfig, MoELayer
from zoo.models.upcycle import upcycle
from zoo.registry import create_model, list_models, model_config

__version__ = "0.1.0"
__all__ = [
    "create_model", "list_models", "model_config", "upcycle", "save_pretrained", "push_to_hub", "from_pretrained",
    "list_pretrained", "MoEConfig", "MoELayer", "ConfigError",
]
