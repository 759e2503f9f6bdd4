"""Caption text as language-model data: the Flickr8k 1k subset's 5000 human captions, split BY PHOTO.

Every caption becomes ``[bos] tokens [eos] pad ...`` of ``context_length`` ids. Tokens are open_clip's BPE
(:class:`~zoo.data.image_text.CaptionTokenizer`) renumbered to a compact vocabulary built from the TRAIN captions
only: 0 = pad, 1 = unk (a BPE token no training caption has), 2 = bos, 3 = eos, then the training tokens. So a tiny
LM needs a ~3k-row embedding instead of open_clip's 49408, and no test token leaks into the vocabulary.

The photo split is the image-text one (:class:`~zoo.data.image_text.Flickr8kDataModule` at the same ``seed`` /
``num_train`` / ``num_test`` / ``num_val``): a photo's five captions are all in one split, as in the LIMoE recipe,
so the test captions describe unseen photos.

Batches: ``{"input_ids": int64 [B, L], "attention_mask": bool [B, L]}`` (right-padded; the task masks padding
out of the loss).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.data.base import SplitDataModule, check_positive_int
from zoo.data.image_text import CaptionTokenizer, read_caption_csv
from zoo.data.paths import find_dataset_dir, incomplete_dataset_error

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIAL = 4


class TokenSequences(Dataset):
    """``input_ids [N, L]`` with ``attention_mask = input_ids != PAD``."""

    def __init__(self, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        return {"input_ids": ids, "attention_mask": ids != PAD}


class CompactVocab:
    """BPE ids -> compact ids (see the module docstring); built from the training captions' BPE tokens."""

    def __init__(self, train_bpe: torch.Tensor, tokenizer: CaptionTokenizer) -> None:
        used = torch.unique(train_bpe)
        special = torch.tensor([tokenizer.pad_token_id, tokenizer.sot_token_id, tokenizer.eot_token_id])
        self.bpe_ids = used[~torch.isin(used, special)]  # compact id SPECIAL + i <-> BPE id bpe_ids[i]
        table = torch.full((tokenizer.vocab_size,), UNK, dtype=torch.long)
        table[self.bpe_ids] = torch.arange(SPECIAL, SPECIAL + len(self.bpe_ids))
        table[tokenizer.pad_token_id], table[tokenizer.sot_token_id], table[tokenizer.eot_token_id] = PAD, BOS, EOS
        self.table, self.tokenizer = table, tokenizer

    @property
    def size(self) -> int:
        return SPECIAL + len(self.bpe_ids)

    def encode(self, bpe: torch.Tensor) -> torch.Tensor:
        return self.table[bpe]

    def decode(self, ids: torch.Tensor) -> str:
        """Text of one sequence of compact ids (special tokens dropped, unk shown as ``<unk>``)."""
        from open_clip.tokenizer import SimpleTokenizer

        words = []
        for i in ids.tolist():
            if i == EOS:
                break
            if i >= SPECIAL:
                words.append(SimpleTokenizer().decode([int(self.bpe_ids[i - SPECIAL])]).strip())
            elif i == UNK:
                words.append("<unk>")
        return " ".join(words)


class Flickr8kCaptionsLMDataModule(SplitDataModule):
    """Flickr8k captions (``<data root>/flickr8k_1k_subset/captions.txt``) as next-token-prediction text.

    Args:
        data_dir: data root or the subset folder; None -> ``$ZOO_DATA``, then ``<repo root>/../shared/data``.
        context_length: tokens per caption including bos / eos (longer captions are cut, eos kept).
        num_train / num_test: photos per split; num_val: photos held out of train for validation (0 = validate
            on the test split, for monitoring only).

    ``vocab_size`` (known after :meth:`setup`, or :meth:`prepare_vocab`) sizes the model: the task takes it.
    """

    FOLDER = "flickr8k_1k_subset"
    CAPTIONS = "captions.txt"

    def __init__(self, data_dir: Optional[str] = None, context_length: int = 32, num_train: int = 800,
                 num_test: int = 200, num_val: int = 0, **loader: Any) -> None:
        super().__init__(**loader)
        self.data_dir = data_dir
        self.context_length = check_positive_int("context_length", context_length, minimum=3)
        self.num_train = check_positive_int("num_train", num_train)
        self.num_test = check_positive_int("num_test", num_test)
        self.num_val = check_positive_int("num_val", num_val, minimum=0)
        self.tokenizer = CaptionTokenizer(self.context_length)
        self.vocab: Optional[CompactVocab] = None
        self.split_indices: dict[str, np.ndarray] = {}
        self.save_hyperparameters()

    @property
    def vocab_size(self) -> Optional[int]:
        """Compact vocabulary size; building it reads the captions (no images)."""
        if self.vocab is None:
            self.setup()
        return self.vocab.size

    def captions_file(self) -> Path:
        folder = find_dataset_dir(self.FOLDER, self.data_dir, marker_files=[self.CAPTIONS])
        if not (folder / self.CAPTIONS).is_file():
            raise incomplete_dataset_error("Flickr8k", folder, [self.CAPTIONS], "captions.txt (CSV image,caption)")
        return folder / self.CAPTIONS

    def photo_split(self, n: int) -> dict[str, np.ndarray]:
        """Photo indices per split, by the rule of ImageTextCSVDataModule (seeded permutation, val from train)."""
        if self.num_train + self.num_test > n or self.num_val >= self.num_train:
            raise ValueError(f"num_train={self.num_train} + num_test={self.num_test} must be at most the {n} photos "
                             f"and num_val={self.num_val} below num_train")
        order = np.random.default_rng(self.seed).permutation(n)
        train, test = np.sort(order[:self.num_train]), np.sort(order[self.num_train:self.num_train + self.num_test])
        val = test
        if self.num_val:
            perm = np.random.default_rng(self.seed + 1).permutation(train)
            val, train = np.sort(perm[:self.num_val]), np.sort(perm[self.num_val:])
        return {"train": train, "val": val, "test": test}

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        groups = read_caption_csv(self.captions_file())
        captions = list(groups.values())
        self.split_indices = self.photo_split(len(captions))
        bpe = {name: self.tokenizer([c for i in idx for c in captions[i]]) for name, idx in self.split_indices.items()}
        self.vocab = CompactVocab(bpe["train"], self.tokenizer)
        return tuple(TokenSequences(self.vocab.encode(bpe[name])) for name in ("train", "val", "test"))  # type: ignore
