"""Shared building blocks: attention, MLP, embeddings."""

from zoo.layers.attention import Attention
from zoo.layers.cross_attention import CrossAttention
from zoo.layers.embeddings import (PatchEmbed, check_image_geometry, embed_images, resize_grid_pos_embed,
                                   resize_pos_embed)
from zoo.layers.inputs import check_token_ids, validate_images
from zoo.layers.lora import LoRALinear, apply_lora, merge_lora
from zoo.layers.mlp import Mlp

__all__ = ["Attention", "CrossAttention", "LoRALinear", "Mlp", "apply_lora", "merge_lora", "PatchEmbed", "check_image_geometry", "check_token_ids", "embed_images",
           "resize_grid_pos_embed", "resize_pos_embed", "validate_images"]
