"""Text tokenizer of the image-text models: open_clip's BPE at a given context length (:class:`CaptionTokenizer`;
its vocabulary ships with the open_clip package, so no download is needed)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

@lru_cache(maxsize=8)
def _simple_tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer  # its BPE vocabulary ships inside the package

    return SimpleTokenizer(context_length=context_length)


class CaptionTokenizer:
    """open_clip's BPE tokenizer at a given ``context_length``: ``tokenizer(list of str) -> int64 [N, L]``.

    ``<start_of_text>`` = 49406, ``<end_of_text>`` = 49407, padding 0, vocabulary size 49408 (the LIMoE
    config's defaults). Captions are lower-cased and whitespace-cleaned by open_clip; long ones are cut with
    the end token kept.
    """

    vocab_size = 49408
    sot_token_id, eot_token_id, pad_token_id = 49406, 49407, 0

    def __init__(self, context_length: int = 16) -> None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 3:
            raise ValueError(f"context_length must be an integer >= 3, got {context_length!r}")
        self.context_length = int(context_length)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if any(not isinstance(t, str) for t in texts):
            raise TypeError("captions must be strings")
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return _simple_tokenizer(self.context_length)(texts).to(torch.long)

    def mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Valid positions: up to and including the end token (padding after it is False)."""
        from zoo.models.limoe import text_mask_from_tokens

        return text_mask_from_tokens(tokens, self.eot_token_id, self.pad_token_id)

    def __repr__(self) -> str:
        return f"CaptionTokenizer(open_clip BPE, context_length={self.context_length})"
