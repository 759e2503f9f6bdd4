"""MoE Zoo: vision and multimodal Mixture-of-Experts models in PyTorch."""

from zoo import models  # noqa: F401  (registers the model families)
from zoo._version import __version__
from zoo.config import ConfigError
from zoo.factory import create_model, from_pretrained, load_pretrained
from zoo.hub import push_to_hub, save_pretrained
from zoo.moe import MoEConfig, MoELayer
from zoo.models.upcycle import upcycle
from zoo.registry import list_models, list_pretrained, model_config

__all__ = [
    "create_model", "list_models", "model_config", "upcycle", "save_pretrained", "push_to_hub", "from_pretrained",
    "load_pretrained", "list_pretrained", "MoEConfig", "MoELayer", "ConfigError", "__version__",
]
