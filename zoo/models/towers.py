"""Frozen vision towers for vision-language models (MoE-LLaVA, Uni-MoE): CLIP ViT and SigLIP encoders built on the
zoo's own encoder (:class:`zoo.models.transformer.Transformer`, :class:`zoo.layers.PatchEmbed`), returning the
tokens of one chosen layer.

Layouts (both are "pre-norm ViT blocks", they differ only in the front end and the activation):

- CLIP ViT (``openai/clip-vit-large-patch14-336``): patch convolution WITHOUT bias, a class token, learned position
  embeddings ``[1, 1 + N, D]``, a LayerNorm before the blocks (transformers' ``pre_layrnorm``, open_clip's
  ``ln_pre``), ``quick_gelu`` MLPs, LayerNorm eps 1e-5.
- SigLIP (``google/siglip-so400m-patch14-384``): patch convolution WITH bias, no class token, position embeddings
  ``[1, N, D]``, no LayerNorm before the blocks, ``gelu_tanh`` MLPs, eps 1e-6.

Both keep their final LayerNorm (``post_layernorm`` / ``ln_post``) as ``encoder.norm`` so a converted tower holds the
whole encoder, but the features never pass through it: MoE-LLaVA (like LLaVA) reads ``hidden_states[-2]``, the output
of the second-to-last block. SigLIP's attention-pooling head and the contrastive projections are not part of the
tower (the converters name them as unused).

Weights: :func:`zoo.convert.hf_vision.vision_tower_from_hf` (Hugging Face CLIP / SigLIP folders) and
:func:`vision_tower_from_open_clip` (a live open_clip ``VisionTransformer``). :data:`KNOWN_TOWERS` has the shapes of
the released towers, so presets can build them with random weights offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from zoo.layers import PatchEmbed, embed_images
from zoo.layers.activations import ACTIVATIONS
from zoo.models.transformer import Transformer, TransformerConfig, init_weights

SELECTS = ("patch", "cls_patch", "drop_first")


@dataclass
class VisionTowerConfig:
    """Shape and layout of a ViT vision tower, and which tokens it returns.

    Shape: ``image_size`` (square; a size the patch does not divide leaves the last ``image_size % patch_size``
    pixel rows / columns unseen, as the official "valid" patch convolution does), ``patch_size``, ``in_chans``, width ``dim`` = Dv, ``depth`` blocks, ``num_heads``,
    MLP hidden ``mlp_dim``, ``activation`` (``quick_gelu`` CLIP, ``gelu_tanh`` SigLIP, ``gelu`` open_clip's non-OpenAI
    towers), LayerNorm ``norm_eps``. Layout: ``class_token`` (a learned token before the patches), ``pre_norm`` (a
    LayerNorm on the embeddings before the blocks), ``patch_bias`` (the patch convolution has a bias).

    Features: ``feature_layer`` indexes the hidden states exactly as transformers' ``output_hidden_states``:
    ``hidden_states[0]`` is the embedding output (after ``pre_norm`` when there is one), ``hidden_states[i]`` the
    output of block ``i - 1``; there are ``depth + 1`` of them and negative indices count from the end, so -1 is the
    last block's output and -2 (MoE-LLaVA, LLaVA) the second-to-last block's. The final LayerNorm is never applied.

    ``select`` picks tokens of that layer:

    - ``"patch"``: the ``(image_size / patch_size)**2`` patch tokens: the class token is dropped when the tower has
      one (CLIP, MoE-LLaVA's ``mm_vision_select_feature="patch"``); SigLIP has none, so all patches are kept.
    - ``"cls_patch"``: every token (class token first, when there is one).
    - ``"drop_first"``: drop token 0 whatever it is. This reproduces the official MoE-LLaVA ``SiglipVisionTower``,
      whose ``"patch"`` rule slices ``[:, 1:]`` as for CLIP although SigLIP has no class token, so it drops the
      top-left PATCH (728 of 729 tokens at 384 px / patch 14). Use it only to match checkpoints trained that way; on
      a CLIP tower it equals ``"patch"``.
    """

    image_size: int = 336
    patch_size: int = 14
    in_chans: int = 3
    dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    activation: str = "quick_gelu"
    norm_eps: float = 1e-5
    class_token: bool = True
    pre_norm: bool = True
    patch_bias: bool = False
    feature_layer: int = -2
    select: str = "patch"

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size={self.patch_size} is larger than image_size={self.image_size}")
        for name in ("in_chans", "dim", "depth", "num_heads", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        usable = tuple(a for a in ACTIVATIONS if a != "swiglu")  # a ViT tower's MLP is not gated
        if self.activation not in usable:
            raise ValueError(f"unknown tower activation {self.activation!r}; expected one of {usable}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.select not in SELECTS:
            raise ValueError(f"select must be one of {SELECTS}, got {self.select!r}")
        n = self.depth + 1
        if not -n <= self.feature_layer < n:
            raise ValueError(f"feature_layer={self.feature_layer} is out of range for a depth-{self.depth} tower: "
                             f"it has {n} hidden states (0 = embeddings, {self.depth} = last block), so use "
                             f"{-n} <= feature_layer <= {self.depth}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token)

    @property
    def feature_index(self) -> int:
        """``feature_layer`` as a non-negative index into the ``depth + 1`` hidden states (= blocks to run)."""
        return self.feature_layer % (self.depth + 1)

    @property
    def num_tokens(self) -> int:
        """N, the number of tokens :meth:`VisionTower.forward` returns per image."""
        total = self.num_prefix_tokens + self.num_patches
        return {"patch": self.num_patches, "cls_patch": total, "drop_first": total - 1}[self.select]

    def encoder_config(self) -> TransformerConfig:
        return TransformerConfig(dim=self.dim, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                                 activation=self.activation, qkv_bias=True, mlp_bias=True, norm_eps=self.norm_eps)


class VisionTower(nn.Module):
    """images ``[B, C, H, W]`` (H = W = ``image_size``) -> features ``[B, N, Dv]`` of the configured layer and
    selection (see :class:`VisionTowerConfig`); ``out_dim`` = Dv, ``num_tokens`` = N.

    Parameters: ``patch_embed.proj`` (the patch convolution), ``cls_token`` ``[1, 1, Dv]`` (CLIP only),
    ``pos_embed`` ``[1, P + g*g, Dv]``, ``pre_norm`` (CLIP only), ``encoder`` (the zoo :class:`Transformer`: blocks,
    then ``encoder.norm`` = the tower's final LayerNorm, kept but not used for features). Only the first
    ``feature_index`` blocks run.
    """

    def __init__(self, config: VisionTowerConfig) -> None:
        super().__init__()
        self.config = cfg = config
        # drop_remainder: SigLIP so400m's 384 px is not a multiple of its patch 14; its "valid" patch convolution
        # leaves the last 6 rows / columns unseen, and so does the zoo's.
        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.in_chans, cfg.dim, bias=cfg.patch_bias,
                                      drop_remainder=True)
        if cfg.class_token:
            self.cls_token: Optional[nn.Parameter] = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        else:
            self.register_parameter("cls_token", None)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix_tokens + cfg.num_patches, cfg.dim))
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.pre_norm else None
        self.encoder = Transformer(cfg.encoder_config())
        self.out_dim, self.num_tokens = cfg.dim, cfg.num_tokens
        init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def check_images(self, images: Tensor) -> None:
        """The size check with the tower's own message (position embeddings are never interpolated here); channels,
        dtype and finiteness are checked by :func:`zoo.layers.validate_images`."""
        size = self.config.image_size
        if isinstance(images, Tensor) and images.ndim == 4 and tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"this vision tower takes {size}x{size} images ({self.config.grid}x{self.config.grid} patches of "
                f"{self.config.patch_size} px, one learned position embedding each), got "
                f"{images.shape[-2]}x{images.shape[-1]}; resize the images to {size}x{size} (as the tower's image "
                "processor does) or use a tower built for that size")

    def embed(self, images: Tensor) -> Tensor:
        """``hidden_states[0]``: images [B, C, H, W] -> [B, P + g*g, Dv] (patches, class token, positions,
        ``pre_norm``)."""
        self.check_images(images)
        x = embed_images(images, self.patch_embed, self.pos_embed, prefix_tokens=self.cls_token)
        return self.pre_norm(x) if self.pre_norm is not None else x

    def hidden_states(self, images: Tensor, upto: Optional[int] = None) -> list[Tensor]:
        """``[hidden_states[0], ..., hidden_states[upto]]`` (default: all ``depth + 1``), each [B, P + g*g, Dv],
        indexed as transformers' ``output_hidden_states`` (see :class:`VisionTowerConfig`)."""
        upto = self.config.depth if upto is None else upto % (self.config.depth + 1)
        states = [self.embed(images)]
        for block in self.encoder.blocks[:upto]:
            states.append(block(states[-1]))
        return states

    def select_tokens(self, hidden: Tensor) -> Tensor:
        """[B, P + g*g, Dv] -> [B, N, Dv] by the config's ``select`` rule."""
        select = self.config.select
        if select == "patch":
            return hidden[:, self.config.num_prefix_tokens:]
        if select == "drop_first":
            return hidden[:, 1:]
        return hidden

    def forward(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] -> features [B, N, Dv]: ``hidden_states[feature_layer]`` after ``select``."""
        x = self.embed(images)
        for block in self.encoder.blocks[:self.config.feature_index]:
            x = block(x)
        return self.select_tokens(x)

    def load_converted(self, state: Mapping[str, Tensor], sources: Optional[Mapping[str, str]] = None) -> None:
        """Load a converted state dict, strictly: every tower tensor filled, nothing extra, shapes equal.
        ``sources`` maps a tower name to the checkpoint tensor(s) it came from, for the error messages."""
        sources = sources or {}
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise ValueError(f"converted vision tower state does not fit the tower: missing {missing}, "
                             f"unexpected {extra}")
        for name, value in state.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(f"{sources.get(name, name)} has shape {tuple(value.shape)} but the tower built from "
                                 f"the config needs {tuple(own[name].shape)} for {name}; the config and the weights "
                                 "do not belong together")
        self.load_state_dict(dict(state), strict=True)


# The released towers' shapes, written from the vision part of their public config.json (hidden_size, image_size,
# intermediate_size, num_attention_heads, num_hidden_layers, patch_size, hidden_act, layer_norm_eps; transformers'
# defaults where the file omits a key). tests/models/test_towers.py maps those config.json values through the HF
# converter and checks they give these entries.
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": dict(
        image_size=336, patch_size=14, in_chans=3, dim=1024, depth=24, num_heads=16, mlp_dim=4096,
        activation="quick_gelu", norm_eps=1e-5, class_token=True, pre_norm=True, patch_bias=False),
    "google/siglip-so400m-patch14-384": dict(
        image_size=384, patch_size=14, in_chans=3, dim=1152, depth=27, num_heads=16, mlp_dim=4304,
        activation="gelu_tanh", norm_eps=1e-6, class_token=False, pre_norm=False, patch_bias=True),
}


def known_tower_config(name: str, feature_layer: int = -2, select: str = "patch") -> VisionTowerConfig:
    """The :class:`VisionTowerConfig` of a released tower in :data:`KNOWN_TOWERS` (random weights; load real ones with
    :func:`zoo.convert.hf_vision.vision_tower_from_hf`)."""
    if name not in KNOWN_TOWERS:
        raise ValueError(f"unknown vision tower {name!r}; known: {sorted(KNOWN_TOWERS)} (or load a Hugging Face "
                         "CLIP / SigLIP folder with zoo.convert.hf_vision.vision_tower_from_hf)")
    return VisionTowerConfig(**KNOWN_TOWERS[name], feature_layer=feature_layer, select=select)


# ------------------------------------------------------------------------------------------------ open_clip
def _open_clip_activation(act: nn.Module) -> str:
    from open_clip.transformer import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}[act.approximate]
    raise ValueError(f"open_clip tower MLP activation {type(act).__name__} is not supported (QuickGELU or nn.GELU)")


def vision_tower_from_open_clip(model_or_visual: nn.Module, feature_layer: int = -2,
                                select: str = "patch") -> VisionTower:
    """A :class:`VisionTower` with the weights of an open_clip ``VisionTransformer`` (``model.visual`` or the model).

    Mapped: ``conv1`` (no bias) -> ``patch_embed.proj``; ``class_embedding`` -> ``cls_token``;
    ``positional_embedding`` ``[1 + N, D]`` -> ``pos_embed``; ``ln_pre`` -> ``pre_norm`` (absent with
    ``no_ln_pre``); per block ``ln_1``/``ln_2`` -> ``norm1``/``norm2``, ``attn.in_proj_*`` (q, k, v stacked, the zoo's
    fused ``qkv`` layout) -> ``attn.qkv``, ``attn.out_proj`` -> ``attn.proj``, ``mlp.c_fc``/``mlp.c_proj`` ->
    ``mlp.fc1``/``mlp.fc2``; ``ln_post`` -> ``encoder.norm``. Not carried: ``proj`` (it acts on the pooled output,
    which the features never use) and patch dropout (training only). Refused with an error: attentional poolers
    (CoCa: their ``ln_post`` has the pooler's width, so the tower has no final LayerNorm to map), LayerScale, custom
    blocks (qk-norm, scaled cosine attention, head scaling), non-square images or patches, and non-ViT towers
    (ModifiedResNet, timm towers).

    Hidden state ``i`` of the zoo tower equals open_clip's ``_embeds`` output (i = 0) and block ``i - 1``'s output
    (``forward_intermediates(..., output_extra_tokens=True)``, class token first).
    """
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(model_or_visual, "visual", model_or_visual)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"expected an open_clip VisionTransformer (or a model whose .visual is one), got "
                        f"{type(visual).__name__}; ResNet and timm towers have no ViT layout to map")
    (image_h, image_w), (patch_h, patch_w) = visual.image_size, visual.patch_size
    if image_h != image_w or patch_h != patch_w:
        raise ValueError(f"only square images and patches are supported, got image {visual.image_size} "
                         f"patch {visual.patch_size}")
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("open_clip towers with an attentional pooler (CoCa) are not supported")
    blocks = list(visual.transformer.resblocks)
    for i, block in enumerate(blocks):
        if not isinstance(block, ResidualAttentionBlock):
            raise ValueError(f"open_clip block {i} is a {type(block).__name__} (qk_norm / scaled cosine attention / "
                             "head scaling); only the standard ResidualAttentionBlock maps onto the zoo encoder")
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            raise ValueError("open_clip towers with LayerScale (ls_init_value) are not supported")
        if block.attn.in_proj_bias is None or block.attn.out_proj.bias is None:
            raise ValueError("open_clip attention without biases is not supported")
    first = blocks[0]
    pre_norm = not isinstance(visual.ln_pre, nn.Identity)
    cfg = VisionTowerConfig(
        image_size=image_h, patch_size=patch_h, in_chans=visual.conv1.in_channels,
        dim=visual.conv1.out_channels, depth=len(blocks), num_heads=first.attn.num_heads,
        mlp_dim=first.mlp.c_fc.out_features, activation=_open_clip_activation(first.mlp.gelu),
        norm_eps=float(first.ln_1.eps), class_token=True, pre_norm=pre_norm,
        patch_bias=visual.conv1.bias is not None, feature_layer=feature_layer, select=select)
    for i, block in enumerate(blocks):
        if _open_clip_activation(block.mlp.gelu) != cfg.activation or block.mlp.c_fc.out_features != cfg.mlp_dim:
            raise ValueError(f"open_clip block {i} differs from block 0 (activation or MLP width)")

    src: dict[str, Tensor] = {}
    names: dict[str, str] = {}

    def put(zoo_name: str, value: Tensor, source: str) -> None:
        src[zoo_name], names[zoo_name] = value.detach(), source

    put("patch_embed.proj.weight", visual.conv1.weight, "conv1.weight")
    if visual.conv1.bias is not None:
        put("patch_embed.proj.bias", visual.conv1.bias, "conv1.bias")
    put("cls_token", visual.class_embedding.reshape(1, 1, -1), "class_embedding")
    put("pos_embed", visual.positional_embedding.unsqueeze(0), "positional_embedding")
    if pre_norm:
        put("pre_norm.weight", visual.ln_pre.weight, "ln_pre.weight")
        put("pre_norm.bias", visual.ln_pre.bias, "ln_pre.bias")
    for i, block in enumerate(blocks):
        ours, theirs = f"encoder.blocks.{i}", f"transformer.resblocks.{i}"
        for zoo_part, module, oc_part in (("norm1", block.ln_1, "ln_1"), ("norm2", block.ln_2, "ln_2"),
                                          ("attn.proj", block.attn.out_proj, "attn.out_proj"),
                                          ("mlp.fc1", block.mlp.c_fc, "mlp.c_fc"),
                                          ("mlp.fc2", block.mlp.c_proj, "mlp.c_proj")):
            put(f"{ours}.{zoo_part}.weight", module.weight, f"{theirs}.{oc_part}.weight")
            put(f"{ours}.{zoo_part}.bias", module.bias, f"{theirs}.{oc_part}.bias")
        put(f"{ours}.attn.qkv.weight", block.attn.in_proj_weight, f"{theirs}.attn.in_proj_weight")
        put(f"{ours}.attn.qkv.bias", block.attn.in_proj_bias, f"{theirs}.attn.in_proj_bias")
    put("encoder.norm.weight", visual.ln_post.weight, "ln_post.weight")
    put("encoder.norm.bias", visual.ln_post.bias, "ln_post.bias")

    tower = VisionTower(cfg)
    tower.load_converted(src, names)
    return tower.to(visual.conv1.weight.dtype)

