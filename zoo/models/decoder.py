"""Decoder-only language models: one typed config covers the LLaMA, Qwen, StableLM-2, Phi-2, Mixtral, OLMoE and
Qwen2-MoE layouts (which differ only in config values, never in code paths chosen by name).

    input_ids [B, S] -> embed [B, S, D] -> depth x DecoderBlock -> final norm -> lm_head -> logits [B, S, V]

A block is pre-norm, either sequential (LLaMA and most):

    x = x + attn(norm_attn(x));  x = x + mlp(norm_mlp(x))

or parallel (Phi-2, GPT-J): one norm feeds both branches, ``x = x + attn(h) + mlp(h)`` with ``h = norm_attn(x)``.
``mlp`` is a dense :class:`zoo.layers.Mlp` or a causal :class:`zoo.moe.MoELayer` (same call signature), placed by
``moe_placement`` / ``moe_every`` / ``moe_last`` / ``moe_layers``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from zoo.layers.decoder_attention import DecoderAttention
from zoo.layers.inputs import check_token_ids
from zoo.layers.kv_cache import KVCache, causal_attention_mask, positions_from_mask
from zoo.layers.mlp import Mlp
from zoo.layers.norm import NormType, make_norm
from zoo.layers.rope import RotaryEmbedding
from zoo.models.output import ModelOutput
from zoo.models.transformer import resolve_moe_layers
from zoo.moe import MoEConfig, MoELayer
from zoo.moe.compiled import compiled_once, cuda_graphs_off
from zoo.moe.layer import collect_moe_aux

# DecoderLM.gradient_checkpointing's values: keep everything, recompute whole blocks, recompute all but MoE layers
GRADIENT_CHECKPOINTING = (False, True, "except_moe")
# DecoderLM.compile_blocks's values: eager, compiled, compiled and replayed as CUDA graphs
COMPILE_BLOCKS = (False, True, "cuda_graphs")

MoEPlacement = Literal["all", "sparse", "first_half", "second_half", "dense"]
PLACEMENTS = ("all", "sparse", "first_half", "second_half", "dense")


def decoder_moe_layers(depth: int, placement: Union[str, Sequence[int], None] = None, every: Optional[int] = None,
                       last: Optional[int] = None, layers: Optional[Sequence[int]] = None) -> tuple[int, ...]:
    """0-based indices of the MoE blocks.

    ``placement`` (MoE-LLaVA's values): "all"; "sparse" = every other block from 0 (0, 2, 4, ...); "first_half" /
    "second_half" = blocks ``[0, depth/2)`` / ``[depth/2, depth)``; "dense" = none; or an explicit list of indices.
    ``every`` / ``last`` / ``layers`` are V-MoE's (:func:`zoo.models.transformer.resolve_moe_layers`). At most one
    of the four may be given; none = dense.
    """
    if placement is not None and not isinstance(placement, str):  # an explicit list given as the placement
        if layers is not None:
            raise ValueError("give the explicit MoE layers once (as placement or as layers)")
        placement, layers = None, tuple(placement)
    if placement is None:
        return resolve_moe_layers(depth, every, last, tuple(layers) if layers is not None else None)
    if any(x is not None for x in (every, last, layers)):
        raise ValueError("give at most one of moe_placement, moe_every, moe_last, moe_layers")
    half = depth // 2
    table = {"all": range(depth), "sparse": range(0, depth, 2), "first_half": range(half),
             "second_half": range(half, depth), "dense": range(0)}
    if placement not in table:
        raise ValueError(f"unknown MoE placement {placement!r}; expected one of {list(PLACEMENTS)} or a list of "
                         "block indices")
    return tuple(table[placement])


@dataclass
class DecoderConfig:
    """Shape and layout of a decoder LM. ``None`` fields derive from others (see each line).

    Attributes:
        vocab_size, dim (D), depth, num_heads (H): the usual.
        num_kv_heads: Hkv for grouped-query attention; None = H (multi-head).
        head_dim: per-head width; None = D / H.
        mlp_dim: hidden width of the dense MLPs; moe_mlp_dim: of each routed expert (None = mlp_dim).
        activation: "swiglu" (gate and up projections) or "gelu" / "gelu_tanh" (Phi-2: "gelu_tanh").
        mlp_bias / qkv_bias / attn_out_bias / lm_head_bias: biases of those projections.
        fused_qkv: one ``qkv`` projection (Qwen-1 style) instead of ``q_proj`` / ``k_proj`` / ``v_proj``.
        qk_norm: RMSNorm over the projected q and k (OLMoE).
        norm, norm_eps, norm_bias: "rmsnorm" or "layernorm" (norm_bias: the LayerNorm's bias).
        parallel_residual: Phi-2's block (one norm, attention and MLP in parallel).
        rope_base, rotary_fraction: RoPE theta and the fraction of each head's channels rotated.
        tie_embeddings: the LM head reuses the token embedding matrix.
        max_seq_len: the context length the model was trained for (default KV-cache limit of generation).
        moe: the MoE layers' config (None = dense model); moe_placement / moe_every / moe_last / moe_layers:
            where they go (:func:`decoder_moe_layers`).
        init_std: std of the normal init of linear and embedding weights.
    """

    vocab_size: int = 32000
    dim: int = 4096
    depth: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    mlp_dim: int = 11008
    moe_mlp_dim: Optional[int] = None
    activation: Literal["swiglu", "gelu", "gelu_tanh"] = "swiglu"
    mlp_bias: bool = False
    qkv_bias: bool = False
    attn_out_bias: bool = False
    lm_head_bias: bool = False
    fused_qkv: bool = False
    qk_norm: bool = False
    norm: NormType = "rmsnorm"
    norm_eps: float = 1e-6
    norm_bias: bool = True
    parallel_residual: bool = False
    rope_base: float = 10000.0
    rotary_fraction: float = 1.0
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    moe: Optional[MoEConfig] = None
    moe_placement: Optional[MoEPlacement] = None
    moe_every: Optional[int] = None
    moe_last: Optional[int] = None
    moe_layers: Optional[tuple[int, ...]] = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "depth", "num_heads", "mlp_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None and self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}; set head_dim")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.kv_heads}")
        indices = self.moe_layer_indices
        if indices and self.moe is None:
            raise ValueError(f"MoE blocks {list(indices)} are placed but moe is None; give a moe section or drop the "
                             "placement")
        if self.moe is not None and self.moe.router != "topk":
            raise ValueError(f"a decoder LM needs causal routing: router {self.moe.router!r} lets later tokens "
                             "change earlier tokens' outputs; use router='topk'")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_width(self) -> int:
        return self.head_dim or self.dim // self.num_heads

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        return decoder_moe_layers(self.depth, self.moe_placement, self.moe_every, self.moe_last, self.moe_layers)


class DecoderBlock(nn.Module):
    """One pre-norm block. ``forward(x [B, S, D], mask [B, S], cos, sin, attn_mask [B, 1, S, T], cache, slots)``."""

    def __init__(self, cfg: DecoderConfig, rope: RotaryEmbedding, index: int, moe: bool) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, cfg.norm_bias)
        self.attn = DecoderAttention(cfg.dim, cfg.num_heads, cfg.kv_heads, cfg.head_width, rope, index,
                                     qkv_bias=cfg.qkv_bias, out_bias=cfg.attn_out_bias, fused_qkv=cfg.fused_qkv,
                                     qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps)
        self.mlp_norm = None if cfg.parallel_residual else make_norm(cfg.norm, cfg.dim, cfg.norm_eps, cfg.norm_bias)
        # Structure, not the module type: whatever later sits in ``mlp`` here (a benchmark peer) counts as MoE too.
        self.moe_position = moe
        if moe:
            self.mlp: nn.Module = MoELayer(cfg.dim, cfg.moe_mlp_dim or cfg.mlp_dim, cfg.moe, causal=True)
        else:
            self.mlp = Mlp(cfg.dim, cfg.mlp_dim, cfg.activation, cfg.mlp_bias)

    def forward(self, x: Tensor, mask: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor,
                cache: Optional[KVCache] = None, slots: Optional[Tensor] = None,
                modality: Optional[Tensor] = None) -> Tensor:
        """``modality [B, S]``: per-token modality ids for an MoE layer's router statistics and per-modality losses
        (a dense MLP ignores them)."""
        residual, mlp_input = self.attention_part(x, cos, sin, attn_mask, cache, slots)
        return residual + self.mlp(mlp_input, mask=mask, modality=modality)

    def attention_part(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor,
                       cache: Optional[KVCache] = None, slots: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Everything of the block before its MLP: (the residual stream the MLP's output is added to, the MLP's
        input), both [B, S, D]. Sequential: (x + attn, mlp_norm(x + attn)); parallel residual (Phi-2): (x + attn,
        attn_norm(x)), both branches reading the same normed input. Apart so that a checkpoint can hold this part
        without the MLP (``DecoderLM.gradient_checkpointing = "except_moe"``)."""
        h = self.attn_norm(x)
        x = x + self.attn(h, cos, sin, attn_mask, cache, slots)
        return x, (h if self.mlp_norm is None else self.mlp_norm(x))


class DecoderLM(nn.Module):
    """``forward(input_ids [B, S], attention_mask [B, S] | None, cache: KVCache | None, *, inputs_embeds
    [B, S, D] | None, modality [B, S] | None) -> ModelOutput`` with ``logits [B, S, V]`` and the MoE layers'
    ``aux_loss`` / ``aux_losses`` / ``routing``.

    Exactly one of ``input_ids`` and ``inputs_embeds`` is given: multimodal models (MoE-LLaVA, Uni-MoE) splice media
    tokens into the embedded text (:mod:`zoo.models.multimodal`) and pass the result as ``inputs_embeds``, with
    ``modality`` ids (0 text, 1 image, ...) that every MoE layer's router receives (per-modality statistics and
    losses; ids must be < ``moe.num_modalities``).

    ``attention_mask`` (True / 1 = real token) may LEFT-pad a batch; RoPE positions count each sequence's real
    tokens. Padding takes no part in attention or routing. With a ``cache`` (:meth:`new_cache`), the call appends
    its tokens to the cache and attends over everything cached (prefill, then one token per decode step).
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg.head_width, cfg.rope_base, cfg.rotary_fraction)
        moe_at = set(cfg.moe_layer_indices)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, self.rope, i, i in moe_at) for i in range(cfg.depth))
        self.norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, cfg.norm_bias)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=cfg.lm_head_bias)
        # Training-time options (not part of the architecture, so not in the config): see the properties.
        self.gradient_checkpointing = False
        self.compile_blocks = False
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def gradient_checkpointing(self) -> Union[bool, str]:
        """Recompute activations in the backward pass instead of keeping them (training only):

        - ``False``: keep everything;
        - ``True``: recompute whole blocks (least memory). An MoE layer then runs twice per step (forward and
          recompute), which CUDA graph trees cannot replay, so its compiled routing runs without CUDA graphs
          (:func:`zoo.moe.compiled.cuda_graphs_off`): one Python launch per kernel;
        - ``"except_moe"``: recompute every block but the MLPs at MoE positions (``DecoderBlock.moe_position``),
          whose activations are kept (the fused path's pre-activation and activation, [T*k, H] each: ~0.27 GB a MoE
          layer for Phi-2x4's shape, 3,328 tokens, bf16). Those layers run once per step, with their CUDA graphs.
          Whatever module sits at an MoE position is treated so (a benchmark peer swapped in there too)."""
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: Union[bool, str]) -> None:
        if value not in GRADIENT_CHECKPOINTING:
            raise ValueError(f"gradient_checkpointing must be one of {GRADIENT_CHECKPOINTING}, got {value!r}")
        self._gradient_checkpointing = value

    @property
    def compile_blocks(self) -> Union[bool, str]:
        """Run the blocks through ``torch.compile`` while training (autograd recording, no cache); evaluation and
        generation run them as they are (generation compiles its own step):

        - ``False``: eager;
        - ``True``: the whole block stack is one compiled function (:func:`_training_blocks`): one graph forward and
          one backward, the checkpoint recomputes inside the backward graph, the MoE layers traced in (their routing
          and, on the GPU, their fused expert kernels). Batches of changing length compile twice (the first length,
          then one graph with a symbolic length for all others, as long as a layer call routes >= 1,024 slots:
          ``tests/kernels/test_fused_moe.py::test_fake_forward_does_not_specialise_the_token_count``);
        - ``"cuda_graphs"``: as ``True``, replayed as CUDA graphs (``mode="reduce-overhead"``): the host launches a
          step's decoder as two replays. Each new sequence length records a graph of its own (memory), so it pays
          off for fixed-length batches (packed or padded to a bucket). Parameter gradients are copied out of the
          graph pool (:func:`zoo.moe.compiled.keep_grads_out_of_graph_pool`).

        Why: eager PyTorch launches a training step's norms, RoPE, residual adds, autocast casts and MLP epilogues one
        kernel at a time, and the host falls behind the GPU (the stage-III Phi-2x4 step of ``benchmarks/
        moe_llava_step.py``, ``benchmarks/results/moe_llava_step.md``); inductor fuses them, and one call for the
        stack replaces a call per block (session 16 compiled block by block: ~1 ms of host time between blocks).

        Each block is compiled on its own instead (:func:`_compiled_block`: a dense block whole, an MoE block's
        attention part; the MoE layer runs eagerly between them, its routing compiled by itself, without CUDA graphs)
        where the stack cannot be one graph:

        - with whole-block checkpointing (``gradient_checkpointing=True``): an MoE layer then sits inside a
          checkpoint, where dynamo refuses its side effect (the layer stores ``aux``);
        - where an MoE layer would break the graph (:meth:`zoo.moe.MoELayer.traces_as_one_graph`: a reference
          dispatcher, which reads row counts on the host, e.g. on the CPU; LoRA experts' own path)."""
        return self._compile_blocks

    @compile_blocks.setter
    def compile_blocks(self, value: Union[bool, str]) -> None:
        if not (isinstance(value, bool) or value == "cuda_graphs"):
            raise ValueError(f"compile_blocks must be one of {COMPILE_BLOCKS}, got {value!r}")
        self._compile_blocks = value

    def reset_parameters(self) -> None:
        """Normal(0, init_std) linear / embedding / expert weights, zero biases, unit norms."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, MoELayer):
                for name, p in m.experts.named_parameters():
                    nn.init.normal_(p, std=std) if name.startswith("w") else nn.init.zeros_(p)

    def fuse_qkv_(self) -> "DecoderLM":
        """Fuse every block's q / k / v projections into one ``qkv`` projection (in place) and set
        ``config.fused_qkv``: the same logits, fewer and longer GEMMs. For inference: a decode step of Phi-2 reads
        three 2560 x 2560 matrices with three short GEMVs per block, which on an H200 ran at 1.8 TB/s, 45% of the copy
        bandwidth (``benchmarks/results/generate_session14.md``). The state dict then has ``attn.qkv`` keys and the
        config says so: ``save_pretrained`` / ``local-dir:`` round-trip as a fused-qkv model."""
        for block in self.blocks:
            block.attn.fuse_qkv_()
        self.config = replace(self.config, fused_qkv=True)
        return self

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` (default ``config.max_seq_len``)
        tokens, in the model's dtype and device."""
        p = self.embed.weight
        cfg = self.config
        return KVCache(cfg.depth, batch_size, cfg.kv_heads, cfg.head_width, max_len or cfg.max_seq_len,
                       dtype=dtype or p.dtype, device=p.device)

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, *, inputs_embeds: Optional[Tensor] = None,
                modality: Optional[Tensor] = None) -> ModelOutput:
        x = self._embed_inputs(input_ids, inputs_embeds)
        B, S = x.shape[:2]
        mask = (torch.ones(B, S, dtype=torch.bool, device=x.device) if attention_mask is None
                else attention_mask.to(torch.bool))
        if mask.shape != (B, S):
            what = "input_ids" if input_ids is not None else "inputs_embeds [B, S]"
            raise ValueError(f"attention_mask must have the shape of {what} {(B, S)}, got {tuple(mask.shape)}")
        if modality is not None:
            if not isinstance(modality, Tensor) or modality.shape != (B, S):
                shape = tuple(modality.shape) if isinstance(modality, Tensor) else type(modality).__name__
                raise ValueError(f"modality must be [B, S] = {(B, S)} integer ids (0 = text), got {shape}")
            modality = modality.to(x.device)
        if cache is None:
            slots = None
            positions = positions_from_mask(mask)
            attn_mask = causal_attention_mask(mask, torch.arange(S, device=x.device))
        else:
            slots, positions, attn_mask = cache.start_step(mask)
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        checkpointing = self._training_call(cache) and self.gradient_checkpointing
        compiled = self.compile_mode(cache)
        if compiled and checkpointing is not True and self._traces_as_one_graph(x):  # see compile_blocks
            stack = compiled_once(_training_blocks, cuda_graphs=compiled == "cuda_graphs")
            x = stack(self, x, mask, cos, sin, attn_mask, modality, checkpointing)
        elif compiled:  # a compiled call per block, the MoE layers run eagerly between them
            for block in self.blocks:
                x = _compiled_block(block, checkpointing, x, mask, cos, sin, attn_mask, modality)
        elif checkpointing:
            x = _training_blocks(self, x, mask, cos, sin, attn_mask, modality, checkpointing)
        else:
            for block in self.blocks:
                x = block(x, mask, cos, sin, attn_mask, cache, slots, modality)
        x = self.norm(x)
        aux_loss, aux_losses, routing = collect_moe_aux(self)
        return ModelOutput(logits=self.lm_head(x), aux_loss=aux_loss, aux_losses=aux_losses, routing=routing,
                           hidden_states=x)

    def compile_mode(self, cache: Optional[KVCache] = None) -> Union[bool, str]:
        """What :attr:`compile_blocks` means for a call now: its value while training with autograd and without a KV
        cache, else False. The multimodal models compile their loss by it too (``shifted_lm_loss(compiled=...)``)."""
        return self.compile_blocks if self._training_call(cache) else False

    def _training_call(self, cache: Optional[KVCache]) -> bool:
        """A training forward: training mode, autograd recording, no KV cache (when the training options apply)."""
        return self.training and torch.is_grad_enabled() and cache is None

    def _traces_as_one_graph(self, x: Tensor) -> bool:
        """Whether every module at an MoE position traces into the compiled stack without a graph break
        (:meth:`zoo.moe.MoELayer.traces_as_one_graph`; a module without that method, e.g. a benchmark peer, is
        taken to trace). dynamo skips a whole loop with a break inside, so one break would leave nothing compiled."""
        return all(getattr(block.mlp, "traces_as_one_graph", lambda _: True)(x)
                   for block in self.blocks if block.moe_position)

    def _embed_inputs(self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor]) -> Tensor:
        """The token embeddings [B, S, D] of ``input_ids`` [B, S], or ``inputs_embeds`` [B, S, D] checked."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids [B, S] (token ids) and inputs_embeds [B, S, D] "
                             f"(already embedded tokens), got {'both' if input_ids is not None else 'neither'}")
        if inputs_embeds is not None:
            D = self.config.dim
            if not isinstance(inputs_embeds, Tensor) or inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != D:
                shape = (tuple(inputs_embeds.shape) if isinstance(inputs_embeds, Tensor)
                         else type(inputs_embeds).__name__)
                raise ValueError(f"inputs_embeds must be [B, S, D={D}] embeddings, got shape {shape}")
            if not inputs_embeds.is_floating_point():
                raise ValueError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}; pass token ids "
                                 "as input_ids instead")
            return inputs_embeds
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be [B, S] token ids, got shape {shape}")
        check_token_ids(input_ids, self.config.vocab_size, "input_ids")
        return self.embed(input_ids)

    def generate(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                 **kwargs: Any) -> Tensor:
        """See :func:`zoo.models.generate.generate` (``inputs_embeds=`` / ``modality=`` prefill from embeddings)."""
        from zoo.models.generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)


def _attention_part(block: DecoderBlock, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor):
    return block.attention_part(x, cos, sin, attn_mask)


def _dense_block(block: DecoderBlock, x: Tensor, mask: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor,
                 modality: Optional[Tensor]) -> Tensor:
    return block(x, mask, cos, sin, attn_mask)


def _block_without_cuda_graphs(block: DecoderBlock, x: Tensor, mask: Tensor, cos: Tensor, sin: Tensor,
                               attn_mask: Tensor, modality: Optional[Tensor]) -> Tensor:
    """A checkpointed block: its MoE layer runs twice per step (forward, recompute in backward), which CUDA graph
    trees cannot replay (:func:`zoo.moe.compiled.cuda_graphs_off`); the compiled step still runs, without graphs."""
    with cuda_graphs_off():
        return block(x, mask, cos, sin, attn_mask, None, None, modality)


def _compiled_moe_block(block: DecoderBlock, x: Tensor, mask: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor,
                        modality: Optional[Tensor]) -> Tensor:
    """An MoE block with its attention part compiled; the MoE layer without CUDA graphs (entered here, inside any
    checkpoint, so that the recompute runs the same way)."""
    residual, mlp_input = compiled_once(_attention_part)(block, x, cos, sin, attn_mask)
    with cuda_graphs_off():
        return residual + block.mlp(mlp_input, mask=mask, modality=modality)


def _compiled_block(block: DecoderBlock, checkpointing: Union[bool, str], x: Tensor, mask: Tensor, cos: Tensor,
                    sin: Tensor, attn_mask: Tensor, modality: Optional[Tensor]) -> Tensor:
    """One block compiled on its own (``compile_blocks`` where the stack cannot be one graph), checkpointed as
    ``checkpointing`` says: a dense block is one compiled call; an MoE block's attention part is compiled and its MoE
    layer runs eagerly without CUDA graphs (:func:`_compiled_moe_block`; under ``"except_moe"`` only the attention
    part is checkpointed and the MoE layer runs once)."""
    if checkpointing == "except_moe" and block.moe_position:
        residual, mlp_input = checkpoint(compiled_once(_attention_part), block, x, cos, sin, attn_mask,
                                         use_reentrant=False)
        with cuda_graphs_off():
            return residual + block.mlp(mlp_input, mask=mask, modality=modality)
    run = _compiled_moe_block if block.moe_position else compiled_once(_dense_block)
    args = (block, x, mask, cos, sin, attn_mask, modality)
    return checkpoint(run, *args, use_reentrant=False) if checkpointing else run(*args)


def _training_blocks(decoder: DecoderLM, x: Tensor, mask: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor,
                     modality: Optional[Tensor], checkpointing: Union[bool, str]) -> Tensor:
    """All blocks of a training forward (``DecoderLM.gradient_checkpointing``): ``"except_moe"`` checkpoints an MoE
    block's attention part and runs its MoE layer once outside; ``True`` checkpoints whole blocks (their own call, so
    their hooks run), MoE layers without CUDA graphs (:func:`_block_without_cuda_graphs`). Traced whole by
    ``compile_blocks`` unless ``True`` (the MoE layer's ``aux`` is a side effect dynamo refuses inside a checkpoint)."""
    for block in decoder.blocks:
        if checkpointing == "except_moe" and block.moe_position:
            residual, mlp_input = checkpoint(_attention_part, block, x, cos, sin, attn_mask, use_reentrant=False)
            x = residual + block.mlp(mlp_input, mask=mask, modality=modality)
        elif checkpointing:  # a dense block needs no cuda_graphs_off (a context manager dynamo would break on)
            run = _block_without_cuda_graphs if block.moe_position else _dense_block
            x = checkpoint(run, block, x, mask, cos, sin, attn_mask, modality, use_reentrant=False)
        else:
            x = block(x, mask, cos, sin, attn_mask, None, None, modality)
    return x
