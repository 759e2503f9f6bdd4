"""The shared pre-norm transformer of every family: an encoder (V-MoE, LIMoE, vision towers) or, with
``causal=True``, a decoder (MoE-LLaVA, Uni-MoE). Which blocks have an MoE MLP is a config value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor, nn

from zoo.layers import Attention, Mlp
from zoo.moe import MoEConfig, MoELayer


def resolve_moe_layers(depth: int, every: Optional[int] = None, last: Optional[int] = None,
                       layers: Optional[tuple[int, ...]] = None) -> tuple[int, ...]:
    """V-MoE placements (0-based block indices).

    ``every=n``: blocks n-1, 2n-1, ... ; ``last=n``: the last n odd blocks (1, 3, 5, ...)[-n:];
    ``layers``: explicit indices. At most one may be given; none = a dense transformer.
    """
    given = [x is not None for x in (every, last, layers)]
    if sum(given) > 1:
        raise ValueError("give at most one of moe_every, moe_last, moe_layers")
    if every is not None:
        if every < 1:
            raise ValueError(f"moe_every must be >= 1, got {every}")
        return tuple(range(every - 1, depth, every))
    if last is not None:
        odd = tuple(range(1, depth, 2))
        if not 0 <= last <= len(odd):
            raise ValueError(f"moe_last={last} but a depth-{depth} transformer has {len(odd)} odd blocks")
        return odd[len(odd) - last:]
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"moe_layers {bad} out of range for depth {depth}")
        return tuple(sorted(set(layers)))
    return ()


@dataclass
class TransformerConfig:
    """Width D = ``dim``, ``depth`` blocks, ``num_heads``, MLP hidden ``mlp_dim``; ``moe`` settings and
    placement (``moe_every`` / ``moe_last`` / ``moe_layers``, see :func:`resolve_moe_layers`)."""

    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "gelu_tanh"
    qkv_bias: bool = True
    mlp_bias: bool = True
    norm_eps: float = 1e-6
    dropout: float = 0.0
    attn_dropout: float = 0.0
    causal: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)
    moe_every: Optional[int] = None
    moe_last: Optional[int] = None
    moe_layers: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "num_heads", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        resolve_moe_layers(self.depth, self.moe_every, self.moe_last, self.moe_layers)

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        return resolve_moe_layers(self.depth, self.moe_every, self.moe_last, self.moe_layers)


class Block(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; ``mlp`` is a dense :class:`Mlp` or a
    :class:`MoELayer` (same call signature)."""

    def __init__(self, cfg: TransformerConfig, moe: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.num_heads, cfg.qkv_bias, cfg.attn_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        if moe:
            self.mlp: nn.Module = MoELayer(cfg.dim, cfg.mlp_dim, cfg.moe)
        else:
            self.mlp = Mlp(cfg.dim, cfg.mlp_dim, cfg.activation, cfg.mlp_bias, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.causal = cfg.causal

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, modality: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask=mask, causal=self.causal)
        return x + self.drop(self.mlp(self.norm2(x), mask=mask, modality=modality))


class Transformer(nn.Module):
    """Blocks then a final LayerNorm: [B, S, D] -> [B, S, D]. ``mask`` [B, S] (True = real token) keeps
    padding out of attention and out of routing; ``modality`` [B, S] ids go to every router."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        moe_at = set(cfg.moe_layer_indices)
        self.blocks = nn.ModuleList(Block(cfg, i in moe_at) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, modality: Optional[Tensor] = None) -> Tensor:
        for block in self.blocks:
            x = block(x, mask, modality)
        return self.norm(x)


def init_weights(module: nn.Module) -> None:
    """ViT-style init: trunc-normal(0.02) linear/conv weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
