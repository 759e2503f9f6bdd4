"""Shared building blocks: attention, MLP, embeddings."""

from zoo.layers.attention import Attention
from zoo.layers.embeddings import PatchEmbed, resize_pos_embed
from zoo.layers.mlp import Mlp

__all__ = ["Attention", "Mlp", "PatchEmbed", "resize_pos_embed"]
