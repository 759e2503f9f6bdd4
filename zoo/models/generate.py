"""Autoregressive generation for :class:`zoo.models.decoder.DecoderLM`: prefill the prompt into a preallocated
KV cache, then one token per sequence per step (greedy, or sampling with temperature / top-k / top-p)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


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
def generate(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None, max_new_tokens: int = 20,
             do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
             max_cache_len: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Continue each prompt of ``input_ids [B, S]`` by up to ``max_new_tokens`` tokens.

    ``attention_mask [B, S]`` marks real tokens; batches must be LEFT-padded (every row's last token real).
    Greedy (``do_sample=False``) is deterministic. A sequence that emits ``eos_token_id`` is finished: later
    steps give it ``pad_token_id`` (default: the eos id); generation stops early once all are finished.
    ``max_cache_len``: KV-cache slots (default S + max_new_tokens); too few raise ValueError.

    Returns ``[B, S + N]`` token ids: the prompt followed by the N <= max_new_tokens generated tokens.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B, S = input_ids.shape
    if S == 0:
        raise ValueError("the prompt is empty (input_ids has 0 tokens): give at least one token, e.g. the BOS id")
    mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
            else attention_mask.to(device=input_ids.device, dtype=torch.bool))
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
        cache = model.new_cache(B, cache_len)
        logits = model(input_ids, mask, cache=cache).logits[:, -1]
        step_mask = torch.ones(B, 1, dtype=torch.bool, device=input_ids.device)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        pad = eos_token_id if pad_token_id is None else pad_token_id
        out = [input_ids]
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
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                break
            logits = model(token[:, None], step_mask, cache=cache).logits[:, -1]
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)
