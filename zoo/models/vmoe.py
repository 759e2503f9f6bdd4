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

from zoo.layers import PatchEmbed, check_image_geometry, embed_images, resize_grid_pos_embed
from zoo.models.output import ModelOutput
from zoo.models.transformer import Transformer, TransformerConfig, init_weights
from zoo.moe import collect_moe_aux
from zoo.registry import CardInfo


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
        check_image_geometry(self.image_size, self.patch_size)
        for name in ("num_classes", "in_chans"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


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
        return self.encoder(embed_images(images, self.patch_embed, self.pos_embed, prefix_tokens=self.cls_token))

    def forward(self, images: Tensor) -> ModelOutput:
        tokens = self.forward_features(images)
        pooled = tokens[:, 0] if self.config.classifier == "token" else tokens[:, 1:].mean(dim=1)
        features = self.pre_logits(pooled)
        aux_loss, aux_losses, routing = collect_moe_aux(self)
        return ModelOutput(logits=self.head(features), aux_loss=aux_loss.to(tokens.device), aux_losses=aux_losses,
                           routing=routing, features=features, hidden_states=tokens)


# ------------------------------------------------------------------------------- what the registry needs to know
NUM_PREFIX_TOKENS = 1  # the CLS token is always there (also with classifier="gap"): pos_embed is [1, 1 + N, D]


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: VMoE) -> tuple[dict[str, Tensor], list[str]]:
    """Adapt a V-MoE checkpoint to ``model``: a position embedding of another image grid is bilinearly resized
    (:func:`zoo.layers.resize_pos_embed`, CLS position kept). Returns (state dict, notes)."""
    sd, notes = dict(state_dict), []
    found, want = sd.get("pos_embed"), model.pos_embed
    if found is not None and found.shape != want.shape:
        resized = resize_grid_pos_embed(found, want.shape, NUM_PREFIX_TOKENS)
        if resized is not None:
            sd["pos_embed"] = resized
            notes.append(f"pos_embed resized from {list(found.shape)} to {list(want.shape)}")
    return sd, notes


def input_size(config: VMoEConfig) -> list[int]:
    return [config.in_chans, config.image_size, config.image_size]


@torch.no_grad()
def predict(model: VMoE, images: Tensor) -> Tensor:
    """Class ids [B] of an image batch (the export's prediction check)."""
    return model(images).logits.argmax(-1)


CARD = CardInfo(
    pipeline_tag="image-classification",
    usage=("logits = model(images).logits  # images [B, C, H, W], normalised as below",),
    citation="\n".join([
        "@inproceedings{riquelme2021scaling,",
        "  title={Scaling Vision with Sparse Mixture of Experts},",
        "  author={Riquelme, Carlos and Puigcerver, Joan and Mustafa, Basil and Neumann, Maxim and",
        "          Jenatton, Rodolphe and Susano Pinto, Andr{\\'e} and Keysers, Daniel and Houlsby, Neil},",
        "  booktitle={NeurIPS}, year={2021}}"]),
)
