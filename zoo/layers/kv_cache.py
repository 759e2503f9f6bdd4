"""A preallocated key/value cache for decoder LMs, and the causal + padding attention mask.

Batched generation uses LEFT padding: every sequence's last prompt token sits in the same slot, so one new
token per sequence goes to the same slot of every row. Slots are positions in the cache; a sequence's RoPE
positions come from its own mask (its first real token is position 0), not from the slot.

The cache holds ``keys`` / ``values`` (one ``[B, Hkv, T, hd]`` tensor per layer) and ``key_valid [B, T]``,
allocated once; a step writes its S new slots in place (``index_copy_`` at slots computed on the device) and
attention always reads all T slots with a mask, so every decode step has the same shapes, the same tensors and no
host-side slot number (what a CUDA graph of the step needs). One tensor per layer, not one ``[L, ...]`` tensor: a
compiled step writes each layer's slots in place only when the layer's cache is a whole input of the graph; written
through a view of one shared tensor, inductor rebuilt and copied the whole cache (every layer's) in every step (on
the H200 a compiled Phi-2x4 step at batch 32 took 46 ms with the copies and 6.3 ms without:
``benchmarks/results/generate_session14.md``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def causal_attention_mask(key_valid: Tensor, query_slots: Tensor) -> Tensor:
    """Boolean mask ``[B, 1, S, T]`` (True = may attend) for queries in slots ``query_slots [S]`` over keys whose
    slots are ``0..T-1`` and validity ``key_valid [B, T]``: key ``j`` is visible to query ``i`` when it is a real
    token and ``j <= slot_i``. A query always sees its own slot, so a padded query row is never all masked (it
    would give NaN; its output is ignored)."""
    T = key_valid.shape[-1]
    key_slots = torch.arange(T, device=key_valid.device)
    causal = key_slots[None, :] <= query_slots[:, None]  # [S, T]
    own = key_slots[None, :] == query_slots[:, None]
    return ((key_valid[:, None, :] & causal) | own)[:, None]


def positions_from_mask(mask: Tensor, offset: Optional[Tensor] = None) -> Tensor:
    """RoPE positions ``[B, S]``: the number of real tokens before each token (``offset [B]`` = real tokens
    already in the cache). Padding gets the position of the next real token (it is masked anyway)."""
    positions = mask.long().cumsum(-1) - mask.long()
    return positions if offset is None else positions + offset[:, None]


class KVCache:
    """Keys and values of every layer for a batch of ``batch_size`` sequences and at most ``max_len`` slots.

    ``start_step(mask [B, S])`` claims the next S slots (error if they do not fit) and returns ``(slots [S],
    positions [B, S], attn_mask [B, 1, S, T])``; each attention layer then calls ``update(layer, slots, k, v)``
    and attends over what it returns.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # per layer
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.num_real = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens so far per sequence
        # The next free slot lives on the device too, so a captured decode step (CUDA graph) reads and advances it
        # on every replay; ``length`` is its host copy, for the overflow check (a graph runner advances it itself).
        self.next_slot = torch.zeros(1, dtype=torch.long, device=device)
        self._offsets = torch.arange(max_len, device=device)
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0

    def start_step(self, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.reserve(*mask.shape)
        return self.advance_on_device(mask)

    def reserve(self, batch_size: int, num_tokens: int) -> None:
        """The host-side part of :meth:`start_step`: check that ``num_tokens`` new tokens of a batch of
        ``batch_size`` fit, and count them in ``length``. A compiled or CUDA-graphed step calls it outside the graph
        and runs :meth:`advance_on_device` inside."""
        if batch_size != self.batch_size:
            raise ValueError(f"the cache was made for batch size {self.batch_size}, got a batch of {batch_size}")
        if self.length + num_tokens > self.max_len:
            what = "1 new token does" if num_tokens == 1 else f"{num_tokens} new tokens do"
            raise ValueError(f"{what} not fit in the KV cache: {self.length} of its {self.max_len} slots are used. "
                             "Make the cache longer (generate(..., max_cache_len=...) >= prompt length + "
                             "max_new_tokens) or shorten the prompt")
        self.length += num_tokens

    def advance_on_device(self, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The device-side part of :meth:`start_step`, with no host state read or written (no checks, ``length``
        untouched): what a compiled or CUDA-graphed step may run. ``mask [B, S]`` -> ``(slots [S], positions [B, S],
        attn_mask [B, 1, S, T])``."""
        S = mask.shape[1]
        slots = self.next_slot + self._offsets[:S]
        mask = mask.to(torch.bool)
        positions = positions_from_mask(mask, self.num_real)
        self.key_valid.index_copy_(1, slots, mask)
        self.num_real += mask.sum(-1)
        self.next_slot += S
        return slots, positions, causal_attention_mask(self.key_valid, slots)

    def update(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v [B, Hkv, S, hd]`` into ``slots``; return the layer's whole ``[B, Hkv, T, hd]`` cache."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, slots, k.to(keys.dtype))
        values.index_copy_(2, slots, v.to(values.dtype))
        return keys, values
