"""V-MoE (Riquelme et al., "Scaling Vision with Sparse Mixture of Experts", NeurIPS 2021).

A ViT whose MLPs in the chosen blocks are MoE layers with noisy top-k routing, capacity per group of
8 images and batch prioritized routing. The CLS token is routed like every other token.

    images [B, C, H, W] -> patches [B, N, D] -> [CLS | patches] + pos [B, 1+N, D] -> Transformer
    -> CLS (or mean) [B, D] -> optional pre-logits (Dense + tanh) -> head [B, num_classes]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from zoo.layers import PatchEmbed
from zoo.models.output import ModelOutput
from zoo.models.transformer import Transformer, TransformerConfig, init_weights
from zoo.moe import collect_moe_aux


@dataclass
class VMoEConfig:
    """One V-MoE: input geometry, head, and the shared transformer config (``encoder``)."""

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    classifier: Literal["token", "gap"] = "token"
    representation_size: Optional[int] = None
    head_bias_init: float = 0.0
    encoder: TransformerConfig = field(default_factory=TransformerConfig)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be divisible by patch_size={self.patch_size}")
        if self.num_classes < 1 or self.in_chans < 1:
            raise ValueError("num_classes and in_chans must be >= 1")


def validate_images(images: Tensor, in_chans: int, image_size: int) -> None:
    """Raise a ValueError that says what is wrong with an image batch and how to fix it."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, C, H, W], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}; "
                         "add a batch axis with images.unsqueeze(0) for a single image")
    _, C, H, W = images.shape
    if C != in_chans:
        raise ValueError(f"expected {in_chans} channel(s), got {C} (shape {tuple(images.shape)}); "
                         "convert the images or create the model with in_chans={C}")
    if (H, W) != (image_size, image_size):
        raise ValueError(f"expected {image_size}x{image_size} images, got {H}x{W}; resize the input or create "
                         f"the model with image_size={H} (position embeddings are resized when loading weights)")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor, got {images.dtype}; normalise them first")
    finite_msg = "images contain NaN or Inf values; check the data pipeline / normalisation"
    if images.device.type == "cpu" and not torch.compiler.is_compiling():  # compiled: checked like on a GPU below
        if not torch.isfinite(images).all():
            raise ValueError(finite_msg)
    elif torch.compiler.is_compiling() or not (images.is_cuda and torch.cuda.is_current_stream_capturing()):
        # On an accelerator, reading the answer back would make the host wait for the GPU at every forward (the
        # eager training step is launch-bound, so that wait is not free). The check runs on the device instead:
        # a NaN / Inf input stops the run with a device-side assert at the next synchronisation. Skipped while a
        # CUDA graph is captured (the graph replays whatever was checked eagerly).
        torch._assert_async(torch.isfinite(images).all(), finite_msg)


class VMoE(nn.Module):
    """Vision Transformer with MoE MLPs. ``forward(images)`` returns a :class:`ModelOutput`."""

    def __init__(self, config: VMoEConfig) -> None:
        super().__init__()
        self.config = config
        D = config.encoder.dim
        self.patch_embed = PatchEmbed(config.image_size, config.patch_size, config.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, D))
        self.encoder = Transformer(config.encoder)
        rep = config.representation_size
        self.pre_logits = nn.Sequential(nn.Linear(D, rep), nn.Tanh()) if rep else nn.Identity()
        self.head = nn.Linear(rep or D, config.num_classes)
        init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, config.head_bias_init)
        for layer in self.modules():
            if hasattr(layer, "experts"):
                layer.experts.reset_parameters()

    def forward_features(self, images: Tensor) -> Tensor:
        """[B, C, H, W] -> final tokens [B, 1+N, D]."""
        validate_images(images, self.config.in_chans, self.config.image_size)
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed
        return self.encoder(x)

    def forward(self, images: Tensor) -> ModelOutput:
        tokens = self.forward_features(images)
        pooled = tokens[:, 0] if self.config.classifier == "token" else tokens[:, 1:].mean(dim=1)
        features = self.pre_logits(pooled)
        aux_loss, aux_losses, routing = collect_moe_aux(self)
        return ModelOutput(logits=self.head(features), aux_loss=aux_loss.to(tokens.device), aux_losses=aux_losses,
                           routing=routing, features=features, hidden_states=tokens)
