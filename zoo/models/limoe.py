"""LIMoE (Mustafa et al., "Multimodal Contrastive Learning with LIMoE: the Language-Image Mixture of
Experts", NeurIPS 2022).

ONE transformer (attention, dense MLPs, routers and experts all shared) encodes both image patches and text
tokens; only the input embeddings and the per-modality pooling + projection heads are modality specific:

    images [B, C, H, W] -> patch embed + image pos ---------\\                       /-> pool_img -> W_img -> z_img
                                                             >-- shared Transformer --<
    tokens [B, L] -> token embed + text pos (+ pad mask) ---/   (modality ids 0 / 1)  \\-> pool_txt -> W_txt -> z_txt

Every token carries its modality id (0 image, 1 text) to the routers (``MoEConfig.num_modalities = 2``), which
use it for the per-modality entropy losses and statistics. Routing is top-k (k=1 in the paper) with batch
prioritized routing; as in the paper, each modality's batch is routed as its own forward pass, so capacity
is per modality batch (images never take capacity from text and vice versa). Text padding tokens are masked:
they are not attended to, never routed, take no capacity (``capacity_from_valid_tokens``: capacity comes from
the valid tokens, so padding does not add any either), are excluded from the auxiliary losses and from pooling.

Where the paper leaves a choice open, this implementation chooses (each also noted at the field):

- Tokenizer: the paper uses a SentencePiece vocabulary; we use open_clip's BPE tokenizer (49,408 ids, ships
  with the package, works offline) with the paper's text length of 16 tokens.
- Text attention is bidirectional (the paper's shared encoder has no causal mask; nothing suggests one).
- Pooling: the paper pools each modality's tokens and applies a per-modality linear map ``z_m = W_m pool(.)``
  without fixing the pooling in the main text. Default: masked mean pooling ("gap" for images, "mean" for
  text); a multihead-attention-pooling head ("map", big_vision style) and the EOT token ("eot", text) are
  options. No CLS token.
- Projection: a bias-free linear layer to ``embed_dim``; embeddings are L2-normalised.
- Temperature: learned, stored as a log scale clamped to ``max_logit_scale`` (CLIP init 1/0.07); with the
  SigLIP sigmoid loss a learned bias too (SigLIP init: scale 10, bias -10).
- Noise: V-MoE's router noise (std 1/E) is kept.
- Auxiliary losses: the paper's per-modality local entropy (mean per-token router entropy, minimised: confident
  routing) and thresholded global entropy (``max(0, tau + Omega_global)`` with ``tau = log(S)``: a modality
  must spread over at least ~S experts), computed by the shared :class:`zoo.moe.MoELayer` on each modality's
  valid tokens. Weights and thresholds may differ per modality
  (``MoEConfig.{local,global}_entropy_weight_by_modality``, ``global_entropy_min_experts_by_modality``); the
  paper does not pin the values in the main text, so the presets choose 0.01 / 0.01 with ``tau = log(E)`` for
  images (always active) and ``log(E/4)`` for text, the minority modality that the threshold lets concentrate.
  V-MoE's importance / load losses can be used on top (``importance_loss_weight`` / ``load_loss_weight``, per
  modality batch since each modality is its own pass); the presets switch them off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import CheckpointMismatchError
from zoo.layers import Mlp, PatchEmbed, check_image_geometry, check_token_ids, embed_images, resize_grid_pos_embed
from zoo.models.output import ModelOutput
from zoo.models.transformer import Transformer, TransformerConfig, init_weights
from zoo.moe import MoEConfig, RoutingStats, collect_moe_aux
from zoo.registry import CardInfo

IMAGE, TEXT = 0, 1  # modality ids carried by every token

# open_clip's SimpleTokenizer ids (vocabulary size 49408): <start_of_text>, <end_of_text>, padding 0.
OPEN_CLIP_VOCAB_SIZE = 49408
OPEN_CLIP_SOT, OPEN_CLIP_EOT = 49406, 49407


def _default_encoder() -> TransformerConfig:
    return TransformerConfig(moe_every=2, moe=MoEConfig(num_experts=8, top_k=1, num_modalities=2,
                                                        capacity_factor=1.0, capacity_from_valid_tokens=True))


@dataclass
class LIMoEConfig:
    """One LIMoE: image and text input geometry, heads, contrastive loss parameters and the ONE shared
    transformer (``encoder``).

    Attributes:
        image_size, patch_size, in_chans: image input (square images).
        patch_stem: "patch" (ViT's linear patch projection, as in the paper) or "conv" (a convolutional stem
            with the same token grid, :class:`zoo.layers.PatchEmbed`; not in the paper).
        vocab_size, context_length: text input; ids from open_clip's tokenizer by default (49408 ids), text
            padded / truncated to ``context_length`` (paper: 16).
        eot_token_id, pad_token_id: used to derive the text mask when none is given: tokens up to and
            including the first EOT are valid; without an EOT, every non-pad token is.
        embed_dim: size of the joint embedding space (the paper does not state it; presets use the width).
        image_pool: "gap" (mean of patch tokens) or "map" (attention pooling with a learned probe).
        text_pool: "mean" (mean of valid tokens), "eot" (the EOT token, i.e. the last valid one) or "map".
        trim_text_padding: drop trailing columns that are padding in every row of a text batch before the
            encoder (saves compute; results are unchanged because padding is masked everywhere).
        loss: "softmax" (symmetric InfoNCE, CLIP) or "sigmoid" (SigLIP); sets which temperature/bias
            parameters exist and their init. The task reads it from here.
        logit_scale_init: initial temperature scale (not log); None = 1/0.07 (softmax) or 10 (sigmoid).
        logit_bias_init: SigLIP bias init (sigmoid only).
        max_logit_scale: the learned scale is clamped to this (CLIP: 100).
        patch_dropout: training only: the fraction of image patches dropped at random per image before the
            encoder (FLIP-style regulariser that also saves compute; not in the paper; 0 = off).
        text_token_dropout: training only: the fraction of caption word tokens (not SOT / EOT) masked out at
            random (a regulariser for small caption sets; not in the paper; 0 = off).
        mask_unseen_tokens: outside training, mask out the word tokens that no training batch contained, as
            text_token_dropout masks words in training. Why: from scratch on a small caption set, an unseen
            token's embedding is still its random init, and after the first LayerNorm it is as large as a
            trained one, so it only adds noise (on Flickr8k 800/200, 32 % of the test captions hold one).
            The model records the ids it saw in a ``seen_tokens [vocab_size]`` bool buffer (in the state dict;
            under DDP the buffer broadcast keeps rank 0's record). Not in the paper; off by default: on the
            Flickr8k validation split it did not measurably change recall (benchmarks/results/
            limoe_flickr8k_sweep.md, round 5).
        encoder: the shared transformer; ``encoder.moe.num_modalities`` must be >= 2 when it has MoE layers.
    """

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    patch_stem: Literal["patch", "conv"] = "patch"
    vocab_size: int = OPEN_CLIP_VOCAB_SIZE
    context_length: int = 16
    eot_token_id: int = OPEN_CLIP_EOT
    pad_token_id: int = 0
    embed_dim: int = 768
    image_pool: Literal["gap", "map"] = "gap"
    text_pool: Literal["mean", "eot", "map"] = "mean"
    trim_text_padding: bool = True
    loss: Literal["softmax", "sigmoid"] = "softmax"
    logit_scale_init: Optional[float] = None
    logit_bias_init: float = -10.0
    max_logit_scale: float = 100.0
    patch_dropout: float = 0.0
    text_token_dropout: float = 0.0
    mask_unseen_tokens: bool = False
    encoder: TransformerConfig = field(default_factory=_default_encoder)

    def __post_init__(self) -> None:
        check_image_geometry(self.image_size, self.patch_size)
        for name in ("in_chans", "vocab_size", "context_length", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.encoder.moe_layer_indices and self.encoder.moe.num_modalities < 2:
            raise ValueError("LIMoE routes image (id 0) and text (id 1) tokens: set encoder.moe.num_modalities >= 2, "
                             f"got {self.encoder.moe.num_modalities}")
        if self.encoder.causal:
            raise ValueError("LIMoE's shared encoder is bidirectional; set encoder.causal=false")
        for name in ("patch_dropout", "text_token_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.logit_scale_init is not None and self.logit_scale_init <= 0:
            raise ValueError(f"logit_scale_init must be > 0, got {self.logit_scale_init}")

    @property
    def initial_logit_scale(self) -> float:
        if self.logit_scale_init is not None:
            return self.logit_scale_init
        return 1 / 0.07 if self.loss == "softmax" else 10.0


@dataclass
class LIMoEOutput(ModelOutput):
    """:class:`ModelOutput` plus the dual-encoder outputs.

    ``image_embeds`` [B_img, embed_dim] / ``text_embeds`` [B_txt, embed_dim]: L2-normalised (None for a
    modality that was not given). ``logits`` [B_img, B_txt] = ``logit_scale * image @ text.T (+ bias)`` when
    both are given. ``logit_scale`` is the (clamped) scale itself, not its log; ``logit_bias`` is None for the
    softmax loss. ``aux_loss`` / ``aux_losses`` sum both forward passes. ``routing`` has one
    :class:`RoutingStats` per MoE layer combining both modalities (``tokens_per_expert_by_modality`` row 0 =
    image tokens, row 1 = text tokens; ``top1_expert`` rows = the images, then the texts, padded with -1 to the
    longer sequence); ``image_routing`` / ``text_routing`` keep each pass's own statistics.
    ``image_features`` [B_img, D]: the pooled image tokens before the projection (what an extra head, e.g. the
    SimCLR head of :class:`zoo.tasks.contrastive.ContrastiveTask`, reads); ``image_aux_loss`` /
    ``text_aux_loss``: each pass's own share of ``aux_loss`` (None for a modality that was not given).
    """

    image_embeds: Optional[Tensor] = None
    text_embeds: Optional[Tensor] = None
    image_features: Optional[Tensor] = None
    image_aux_loss: Optional[Tensor] = None
    text_aux_loss: Optional[Tensor] = None
    logit_scale: Optional[Tensor] = None
    logit_bias: Optional[Tensor] = None
    image_routing: list[RoutingStats] = field(default_factory=list)
    text_routing: list[RoutingStats] = field(default_factory=list)


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision's MAPHead): a learned probe attends over the valid tokens,
    then a residual MLP. [B, S, D] (+ mask [B, S]) -> [B, D]. Modality specific (one per modality)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim)
        nn.init.xavier_uniform_(self.probe)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        probe = self.probe.expand(x.shape[0], -1, -1).to(x.dtype)
        pad = None if mask is None else ~mask.to(torch.bool)
        out = self.attn(probe, x, x, key_padding_mask=pad, need_weights=False)[0]
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


def masked_mean(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean over the valid tokens: [B, S, D], [B, S] bool -> [B, D]."""
    if mask is None:
        return x.mean(dim=1)
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def text_mask_from_tokens(tokens: Tensor, eot_token_id: int = OPEN_CLIP_EOT, pad_token_id: int = 0) -> Tensor:
    """[B, L] ids -> [B, L] bool: valid up to and including the first EOT token; rows without an EOT keep
    their non-pad tokens. (open_clip pads with id 0, which is also the id of '!', so the EOT decides.)"""
    is_eot = tokens == eot_token_id
    has_eot = is_eot.any(dim=1, keepdim=True)
    before_or_at_eot = (torch.cumsum(is_eot.int(), dim=1) - is_eot.int()) == 0
    return torch.where(has_eot, before_or_at_eot, tokens != pad_token_id)


def merge_routing_stats(image: list[RoutingStats], text: list[RoutingStats]) -> list[RoutingStats]:
    """Combine the per-layer statistics of the image pass and the text pass (see :class:`LIMoEOutput`)."""
    if not image or not text:
        return list(image or text)
    merged = []
    for a, b in zip(image, text):
        valid_a, valid_b = (a.top1_expert >= 0).sum(), (b.top1_expert >= 0).sum()
        total_valid = (valid_a + valid_b).clamp_min(1)
        importance = (a.importance * valid_a + b.importance * valid_b) / total_valid
        dropped = (a.dropped_fraction * valid_a + b.dropped_fraction * valid_b) / total_valid
        S = max(a.top1_expert.shape[1], b.top1_expert.shape[1])
        top1 = torch.cat([F.pad(a.top1_expert, (0, S - a.top1_expert.shape[1]), value=-1),
                          F.pad(b.top1_expert, (0, S - b.top1_expert.shape[1]), value=-1)])
        caps = [c for c in (a.capacity, b.capacity) if c is not None]
        merged.append(RoutingStats(
            tokens_per_expert=a.tokens_per_expert + b.tokens_per_expert,
            dropped_fraction=dropped,
            importance=importance,
            # each pass fills only its own modality's row, the other rows are zero
            tokens_per_expert_by_modality=a.tokens_per_expert_by_modality + b.tokens_per_expert_by_modality,
            dropped_fraction_by_modality=a.dropped_fraction_by_modality + b.dropped_fraction_by_modality,
            top1_expert=top1,
            capacity=max(caps) if caps else None,
        ))
    return merged


def _sum_losses(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v
    return out


class LIMoE(nn.Module):
    """Language-Image MoE: one shared MoE transformer for images and text.

    ``forward(images=None, text=None, text_mask=None)`` returns a :class:`LIMoEOutput`; ``encode_image`` /
    ``encode_text`` return only the normalised embeddings (the auxiliary losses and routing of that pass stay
    available through :meth:`forward`).
    """

    def __init__(self, config: LIMoEConfig) -> None:
        super().__init__()
        self.config = config
        D = config.encoder.dim
        # Modality-specific inputs.
        self.patch_embed = PatchEmbed(config.image_size, config.patch_size, config.in_chans, D, config.patch_stem)
        self.image_pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, D))
        self.token_embed = nn.Embedding(config.vocab_size, D)
        self.text_pos_embed = nn.Parameter(torch.zeros(1, config.context_length, D))
        if config.mask_unseen_tokens:
            self.register_buffer("seen_tokens", torch.zeros(config.vocab_size, dtype=torch.bool))
        # The ONE shared transformer.
        self.encoder = Transformer(config.encoder)
        # Modality-specific pooling and projection heads.
        heads, mlp = config.encoder.num_heads, config.encoder.mlp_dim
        self.image_map = MAPHead(D, heads, mlp, config.encoder.norm_eps) if config.image_pool == "map" else None
        self.text_map = MAPHead(D, heads, mlp, config.encoder.norm_eps) if config.text_pool == "map" else None
        self.image_proj = nn.Linear(D, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(D, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.initial_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(config.logit_bias_init)) if config.loss == "sigmoid" else None
        init_weights(self)
        nn.init.trunc_normal_(self.image_pos_embed, std=0.02)
        nn.init.trunc_normal_(self.text_pos_embed, std=0.01)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        for m in (self.image_map, self.text_map):
            if m is not None:
                nn.init.xavier_uniform_(m.probe)
                m.attn._reset_parameters()
        for layer in self.modules():
            if hasattr(layer, "experts"):
                layer.experts.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """Position embeddings and attention-pooling probes get no weight decay (``zoo.tasks.optim``)."""
        return {"image_pos_embed", "text_pos_embed", "probe"}

    # ------------------------------------------------------------------------------------ inputs
    def text_mask(self, tokens: Tensor) -> Tensor:
        return text_mask_from_tokens(tokens, self.config.eot_token_id, self.config.pad_token_id)

    def _check_text(self, tokens: Tensor, mask: Optional[Tensor]) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64):
            shape = (f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, Tensor)
                     else type(tokens).__name__)
            raise ValueError(f"text must be integer token ids [B, L], got {shape}; tokenize captions with "
                             "zoo.data.image_text.CaptionTokenizer (open_clip BPE)")
        L = tokens.shape[1]
        if L > self.config.context_length:
            raise ValueError(f"text has {L} tokens but the model's context_length is {self.config.context_length}; "
                             f"tokenize with context_length={self.config.context_length}")
        check_token_ids(tokens, self.config.vocab_size, "text")
        mask = self.text_mask(tokens) if mask is None else mask.to(torch.bool)
        if mask.shape != tokens.shape:
            raise ValueError(f"text_mask must have the shape of text {tuple(tokens.shape)}, got {tuple(mask.shape)}")
        if tokens.shape[0] and not mask.any(dim=1).all():
            raise ValueError("every text needs at least one valid token (an empty caption has SOT and EOT)")
        return mask

    # ----------------------------------------------------------------------------------- towers
    def _run_encoder(self, x: Tensor, mask: Optional[Tensor], modality_id: int):
        modality = torch.full(x.shape[:2], modality_id, dtype=torch.long, device=x.device)
        for layer in self.encoder.modules():  # no stale statistics from the other modality's pass
            if hasattr(layer, "aux"):
                layer.aux = None
        tokens = self.encoder(x, mask=mask, modality=modality)
        aux, losses, stats = collect_moe_aux(self.encoder)
        return tokens, aux.to(x.device), losses, stats

    def image_tokens(self, images: Tensor):
        """[B, C, H, W] -> (final tokens [B, N, D], aux loss, aux losses, routing stats)."""
        x = embed_images(images, self.patch_embed, self.image_pos_embed)
        p = self.config.patch_dropout
        if self.training and p > 0:
            B, N, D = x.shape
            keep = max(1, int(round(N * (1 - p))))
            idx = torch.rand(B, N, device=x.device).argsort(dim=1)[:, :keep].sort(dim=1).values
            x = torch.gather(x, 1, idx.unsqueeze(-1).expand(B, keep, D))
        return self._run_encoder(x, None, IMAGE)

    def text_tokens(self, tokens: Tensor, mask: Optional[Tensor] = None):
        """[B, L] ids -> (final tokens [B, L', D], mask [B, L'], aux loss, aux losses, routing stats);
        L' < L when trailing all-padding columns were trimmed."""
        mask = self._check_text(tokens, mask)
        if self.config.trim_text_padding and tokens.shape[0]:
            keep = int(mask.any(dim=0).nonzero().max().item()) + 1
            tokens, mask = tokens[:, :keep], mask[:, :keep]
        L = tokens.shape[1]
        p = self.config.text_token_dropout
        if self.config.mask_unseen_tokens and self.training:
            # Record before dropout: a dropped word was still seen in a training caption. Invalid positions
            # write the always-kept EOT id: no boolean indexing, so no host sync.
            seen = torch.where(mask, tokens, self.config.eot_token_id).flatten()
            self.seen_tokens.index_fill_(0, seen, True)
        unseen_masked = self.config.mask_unseen_tokens and not self.training
        dropped = self.training and p > 0
        if unseen_masked or dropped:  # SOT and EOT are always kept
            special = (tokens == self.config.eot_token_id) | (torch.arange(L, device=tokens.device) == 0)
            if unseen_masked:
                mask = mask & (special | self.seen_tokens[tokens])
            if dropped:
                mask = mask & (special | (torch.rand(tokens.shape, device=tokens.device) >= p))
        x = self.token_embed(tokens) + self.text_pos_embed[:, :L]
        out, aux, losses, stats = self._run_encoder(x, mask, TEXT)
        return out, mask, aux, losses, stats

    def _pool_image(self, tokens: Tensor) -> Tensor:
        return self.image_map(tokens) if self.image_map is not None else tokens.mean(dim=1)

    def _pool_text(self, tokens: Tensor, mask: Tensor) -> Tensor:
        if self.config.text_pool == "map":
            return self.text_map(tokens, mask)
        if self.config.text_pool == "eot":
            last = mask.long().cumsum(dim=1).argmax(dim=1)  # index of the last valid token
            return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]
        return masked_mean(tokens, mask)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        tokens, *_ = self.image_tokens(images)
        z = self.image_proj(self._pool_image(tokens))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, tokens: Tensor, mask: Optional[Tensor] = None, normalize: bool = True) -> Tensor:
        out, mask, *_ = self.text_tokens(tokens, mask)
        z = self.text_proj(self._pool_text(out, mask))
        return F.normalize(z, dim=-1) if normalize else z

    def scale_and_bias(self) -> tuple[Tensor, Optional[Tensor]]:
        """The temperature scale (clamped to ``max_logit_scale``) and the SigLIP bias (None for softmax)."""
        scale = self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()
        return scale, self.logit_bias

    # ---------------------------------------------------------------------------------- forward
    def forward(self, images: Optional[Tensor] = None, text: Optional[Tensor] = None,
                text_mask: Optional[Tensor] = None) -> LIMoEOutput:
        """Encode whichever modalities are given; each modality's batch is one forward pass of the shared
        transformer (routing groups and capacity per modality batch, as in the paper)."""
        if images is None and text is None:
            raise ValueError("LIMoE.forward needs images, text or both")
        device = (images if images is not None else text).device
        aux = torch.zeros((), device=device)
        losses: dict[str, Tensor] = {}
        img_emb = txt_emb = img_feat = img_aux = txt_aux = None
        img_stats: list[RoutingStats] = []
        txt_stats: list[RoutingStats] = []
        if images is not None:
            tokens, img_aux, l, img_stats = self.image_tokens(images)
            img_feat = self._pool_image(tokens)
            img_emb = F.normalize(self.image_proj(img_feat), dim=-1)
            aux, losses = aux + img_aux, _sum_losses(losses, l)
        if text is not None:
            tokens, mask, txt_aux, l, txt_stats = self.text_tokens(text, text_mask)
            txt_emb = F.normalize(self.text_proj(self._pool_text(tokens, mask)), dim=-1)
            aux, losses = aux + txt_aux, _sum_losses(losses, l)
        scale, bias = self.scale_and_bias()
        logits = None
        if img_emb is not None and txt_emb is not None:
            logits = scale * img_emb @ txt_emb.t()
            if bias is not None:
                logits = logits + bias
        return LIMoEOutput(logits=logits, aux_loss=aux, aux_losses=losses,
                           routing=merge_routing_stats(img_stats, txt_stats), image_embeds=img_emb,
                           text_embeds=txt_emb, logit_scale=scale, logit_bias=bias, image_routing=img_stats,
                           text_routing=txt_stats, image_features=img_feat, image_aux_loss=img_aux,
                           text_aux_loss=txt_aux)


# ------------------------------------------------------------------------------- what the registry needs to know
def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: LIMoE) -> tuple[dict[str, Tensor], list[str]]:
    """Adapt a LIMoE checkpoint to ``model``. Returns (state dict, notes).

    - ``image_pos_embed`` ``[1, g*g, D]`` (no prefix token: LIMoE has no CLS token) of another image grid is
      bilinearly resized (:func:`zoo.layers.resize_pos_embed`).
    - ``text_pos_embed`` ``[1, L, D]`` holds one learned vector per absolute text position, not a grid: a shorter
      ``context_length`` keeps the first positions (what a text of that length uses anyway); a longer one is
      refused, since positions past the trained length were never learned.
    """
    sd, notes = dict(state_dict), []
    found, want = sd.get("image_pos_embed"), model.image_pos_embed
    if found is not None and found.shape != want.shape:
        resized = resize_grid_pos_embed(found, want.shape, num_prefix_tokens=0)
        if resized is not None:
            sd["image_pos_embed"] = resized
            notes.append(f"image_pos_embed resized from {list(found.shape)} to {list(want.shape)}")
    found, want = sd.get("text_pos_embed"), model.text_pos_embed
    if found is not None and found.shape != want.shape and found.ndim == 3 and found.shape[-1] == want.shape[-1]:
        have, need = found.shape[1], want.shape[1]
        if need > have:
            raise CheckpointMismatchError(
                f"the checkpoint's text position embedding covers context_length={have} tokens, the model asks for "
                f"context_length={need}: positions past {have} were never trained and text positions are not "
                f"interpolated; create the model with context_length <= {have}")
        sd["text_pos_embed"] = found[:, :need]
        notes.append(f"text_pos_embed truncated from {list(found.shape)} to {list(want.shape)} "
                     f"(context_length {have} -> {need}: the first {need} positions kept)")
    return sd, notes


def input_size(config: LIMoEConfig) -> list[int]:
    return [config.in_chans, config.image_size, config.image_size]


CARD = CardInfo(
    pipeline_tag="zero-shot-image-classification",
    citation="\n".join([
        "@inproceedings{mustafa2022multimodal,",
        "  title={Multimodal Contrastive Learning with LIMoE: the Language-Image Mixture of Experts},",
        "  author={Mustafa, Basil and Riquelme, Carlos and Puigcerver, Joan and Jenatton, Rodolphe and",
        "          Houlsby, Neil},",
        "  booktitle={NeurIPS}, year={2022}}"]),
)
