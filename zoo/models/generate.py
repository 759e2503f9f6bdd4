"""Autoregressive generation for :class:`zoo.models.decoder.DecoderLM`: prefill the prompt (token ids, or
embeddings for multimodal prompts) into a preallocated KV cache, then one token per sequence per step (greedy, or
sampling with temperature / top-k / top-p).

:func:`compiled_decode_step` gives the decode step (one token per sequence into the KV cache) compiled by
``torch.compile``; ``generate(..., compile=True)`` uses it."""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from zoo.layers.kv_cache import KVCache
from zoo.moe.layer import routing_statistics_off


class _DeviceSlotCache:
    """What a compiled decode step sees of a :class:`KVCache`: the same tensors, and only the device-side part of
    :meth:`KVCache.start_step` (slots from ``next_slot``, positions from ``num_real``, the validity write).

    Why: ``KVCache.start_step`` also checks and advances the host counter ``length``. Traced by dynamo, that Python
    int becomes a guarded constant, so every step (a new ``length``) would recompile. :class:`CompiledDecodeStep`
    does that host bookkeeping outside the compiled region instead; the traced part has no host state left, which
    is also what lets a CUDA graph of the compiled step replay it (as ``GraphedDecodeStep`` does for the eager
    step). The device part is ``KVCache.advance_on_device``, the one ``KVCache.start_step`` runs too."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def start_step(self, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``mask [B, S]`` -> ``(slots [S], positions [B, S], attn_mask [B, 1, S, T])``: ``KVCache.start_step``
        without its host part (``KVCache.advance_on_device``)."""
        return self.cache.advance_on_device(mask)

    def update(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(layer, slots, k, v)


class CompiledDecodeStep:
    """``step(token [B, 1], cache, modality [B, 1] | None = None) -> logits [B, 1, V]``: one decode step of
    ``model`` (``model(token, cache=cache, modality=modality).logits``, the model in eval mode) through
    ``torch.compile(dynamic=False)``, so inductor fuses the step's many small kernels (norms, RoPE, residual adds,
    activations, routing ops), which dominate a batch-1 decode step's time on a GPU.

    Shapes are static: the KV cache is preallocated and its next slot lives on the device, so every step of one
    cache (and of any other cache with the same batch size and length) reuses the first step's graph; only a new
    batch size, cache length, dtype or device compiles again. The host side of the cache (the overflow check and
    ``cache.length``: :meth:`KVCache.reserve`) is done here, outside the compiled region (:class:`_DeviceSlotCache`
    says why).

    ``mode`` is passed to ``torch.compile``; the default (None) makes no CUDA graph of its own: the caller may
    capture the compiled step in its own ``torch.cuda.graph`` (``benchmarks/generate.py``: "zoo + compile + CUDA
    graph"), which is the simplest way to replay a step that writes into caller-owned cache tensors.
    ``mode="reduce-overhead"`` (CUDA graph trees) is not the default because the step mutates the cache tensors in
    place, and the trees replay a graph only when its mutated inputs have static addresses (parameters, buffers,
    tensors marked static); the cache tensors are plain inputs of the step, so the trees would skip the graph
    (this reasoning is not yet checked on a GPU). Before capturing the step in a CUDA graph, call it once outside
    the capture: the first call (per batch size and cache length) compiles.

    Every step object shares one compiled code object, and dynamo keeps at most ``torch._dynamo.config.
    recompile_limit`` (8) graphs per code object: past that many (model, batch size, cache length) combinations in
    one process, dynamo runs the step eagerly with a warning (same values, no fusion).

    The model is held by a weak reference when ``weak=True`` (what :func:`generate` uses for its per-model cache of
    steps), else strongly.
    """

    def __init__(self, model: nn.Module, mode: Optional[str] = None, weak: bool = False) -> None:
        model_ref = weakref.ref(model) if weak else (lambda: model)

        def step(token: Tensor, cache: _DeviceSlotCache, modality: Optional[Tensor]) -> Tensor:
            return model_ref()(token, cache=cache, modality=modality).logits

        self._compiled = torch.compile(step, dynamic=False, mode=mode)

    def __call__(self, token: Tensor, cache: KVCache, modality: Optional[Tensor] = None) -> Tensor:
        if token.ndim != 2 or token.shape[1] != 1:
            raise ValueError(f"a decode step takes one token per sequence, token [B, 1]; got {tuple(token.shape)}")
        # Dynamo guards on strides, even of the size-1 token axis (``ids[:, -1:]`` is [B, 1] with stride (S, 1)):
        # give the compiled step the same (1, 1) layout every time, or a slice as the first token recompiles later.
        token, modality = _packed(token), None if modality is None else _packed(modality)
        cache.reserve(*token.shape)  # the host part of the step (the compiled one advances next_slot on the device)
        return self._compiled(token, _DeviceSlotCache(cache), modality)

    def prefill(self, input_ids: Tensor, cache: KVCache) -> Tensor:
        """``input_ids [B, S]`` (no padding) appended to ``cache`` through the same compiled function: the
        logits ``[B, S, V]`` of ``model(input_ids, cache=cache)``. Shapes are static, so every prompt length (and
        cache length) compiles once: for serving fixed-length prompts and for benchmarks, not for prompts of every
        length (``generate`` prefills eagerly)."""
        if input_ids.ndim != 2:
            raise ValueError(f"prefill takes input_ids [B, S], got {tuple(input_ids.shape)}")
        cache.reserve(*input_ids.shape)
        return self._compiled(input_ids.contiguous(), _DeviceSlotCache(cache), None)


def _packed(x: Tensor) -> Tensor:
    """``x [B, 1]`` with strides (1, 1) (a copy only when it has others)."""
    return x if x.stride() == (1, 1) else x.clone(memory_format=torch.contiguous_format)


def compiled_decode_step(model: nn.Module, mode: Optional[str] = None) -> CompiledDecodeStep:
    """A :class:`CompiledDecodeStep` of ``model``: ``step(token [B, 1], cache) -> logits [B, 1, V]``, the same
    logits as ``model(token, cache=cache).logits`` (the model in eval mode; wrap calls in
    ``torch.no_grad()``)."""
    return CompiledDecodeStep(model, mode=mode)


# generate(compile=True): one compiled step per model, reused by later calls (compiling is the slow part). The step
# holds its model weakly, so this cache does not keep models alive.
_COMPILED_STEPS: "weakref.WeakKeyDictionary[nn.Module, CompiledDecodeStep]" = weakref.WeakKeyDictionary()


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> Tensor:
    """``logits [B, V]`` divided by ``temperature``, then everything outside the ``top_k`` largest and outside
    the smallest set whose probability reaches ``top_p`` (nucleus) set to -inf. The top token always stays."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(model: nn.Module, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
             max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
             max_cache_len: Optional[int] = None, generator: Optional[torch.Generator] = None, *,
             inputs_embeds: Optional[Tensor] = None, modality: Optional[Tensor] = None,
             on_token: Optional[Callable[[Tensor], None]] = None, compile: bool = False) -> Tensor:
    """Continue each prompt of ``input_ids [B, S]`` (or of ``inputs_embeds [B, S, D]``) by up to
    ``max_new_tokens`` tokens.

    ``attention_mask [B, S]`` marks real tokens; batches must be LEFT-padded (every row's last token real).
    Greedy (``do_sample=False``) is deterministic. A sequence that emits ``eos_token_id`` is finished: later
    steps give it ``pad_token_id`` (default: the eos id); generation stops early once all are finished.
    ``max_cache_len``: KV-cache slots (default S + max_new_tokens); too few raise ValueError.

    ``inputs_embeds`` (instead of ``input_ids``): the prompt is already embedded (a multimodal model's spliced text
    and media tokens, :mod:`zoo.models.multimodal`); it is prefilled as is, with ``modality [B, S]`` ids for the
    MoE routers, and each generated token is then embedded by the model (text, modality 0).

    ``on_token``: called with each step's tokens ``[B]`` (on the model's device) as soon as they are chosen, so a
    caller can stream the answer (``python -m zoo.generate`` prints each token as it comes); it does not change
    what is generated.

    ``compile``: run the decode steps (not the prefill, whose length varies) through :func:`compiled_decode_step`
    (one compiled step per model, kept for later calls; the first call of a batch size and cache length compiles).
    Same tokens as eager decoding up to floating-point rounding.

    Returns ``[B, S + N]`` token ids: the prompt followed by the N <= max_new_tokens generated tokens; with
    ``inputs_embeds`` (no prompt ids to return) only the ``[B, N]`` generated tokens.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids [B, S] and inputs_embeds [B, S, D] as the prompt")
    prompt = input_ids if input_ids is not None else inputs_embeds
    if prompt.ndim != (2 if input_ids is not None else 3):
        name = "input_ids must be [B, S]" if input_ids is not None else "inputs_embeds must be [B, S, D]"
        raise ValueError(f"{name}, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B, S = prompt.shape[:2]
    device = prompt.device
    if S == 0:
        raise ValueError("the prompt is empty (input_ids has 0 tokens): give at least one token, e.g. the BOS id")
    mask = (torch.ones(B, S, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.bool))
    if mask.shape != (B, S):
        raise ValueError(f"attention_mask must have the prompt's shape {(B, S)}, got {tuple(mask.shape)}")
    if not bool(mask[:, -1].all()):
        raise ValueError("attention_mask has padding at the end of a row: pad batches on the LEFT for generation "
                         "(tokenizer.padding_side = 'left')")
    cache_len = max_cache_len if max_cache_len is not None else S + max_new_tokens
    if S + max_new_tokens > cache_len:
        raise ValueError(f"the prompt ({S} tokens) plus max_new_tokens={max_new_tokens} needs {S + max_new_tokens} "
                         f"KV-cache slots but max_cache_len={cache_len}; raise max_cache_len or shorten the prompt")
    was_training = model.training
    model.eval()
    try:
        # nobody reads the MoE layers' losses and statistics while generating: skip their kernels every step
        with routing_statistics_off():
            cache = model.new_cache(B, cache_len)
            if input_ids is not None:
                logits = model(input_ids, mask, cache=cache, modality=modality).logits[:, -1]
            else:
                logits = model(None, mask, cache=cache, inputs_embeds=inputs_embeds, modality=modality).logits[:, -1]
            step_mask = torch.ones(B, 1, dtype=torch.bool, device=device)
            decode = None
            if compile:
                decode = _COMPILED_STEPS.get(model)
                if decode is None:
                    decode = _COMPILED_STEPS[model] = CompiledDecodeStep(model, weak=True)
            # Generated tokens are text: modality 0 where the prompt carried modality ids.
            step_modality = None if modality is None else torch.zeros(B, 1, dtype=torch.long, device=device)
            finished = torch.zeros(B, dtype=torch.bool, device=device)
            pad = eos_token_id if pad_token_id is None else pad_token_id
            out = [] if input_ids is None else [input_ids]
            for step in range(max_new_tokens):
                if do_sample:
                    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
                    token = torch.multinomial(probs, 1, generator=generator)[:, 0]
                else:
                    token = logits.argmax(-1)
                if eos_token_id is not None:
                    token = torch.where(finished, torch.full_like(token, pad), token)
                    finished |= token == eos_token_id
                out.append(token[:, None])
                if on_token is not None:
                    on_token(token)
                if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                    break
                if decode is not None:  # the compiled step's mask is all ones too (its default)
                    logits = decode(token[:, None], cache, step_modality)[:, -1]
                else:
                    logits = model(token[:, None], step_mask, cache=cache, modality=step_modality).logits[:, -1]
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)
