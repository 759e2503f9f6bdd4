"""Autoregressive generation for :class:`zoo.models.decoder.DecoderLM`: prefill the prompt (token ids, or
embeddings for multimodal prompts) into a preallocated KV cache, then one token per sequence per step (greedy, or
sampling with temperature / top-k / top-p)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from zoo.moe.layer import routing_statistics_off


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
             on_token: Optional[Callable[[Tensor], None]] = None) -> Tensor:
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
                logits = model(token[:, None], step_mask, cache=cache, modality=step_modality).logits[:, -1]
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)
