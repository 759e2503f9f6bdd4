"""Reading training checkpoints (``last.ckpt``) with one clear error for a file that is not one.

``train.py --ckpt_path`` and ``eval.py --checkpoint`` both go through :func:`load_training_checkpoint`: a
corrupt file (random bytes, truncated write, empty file) or a foreign one (a plain ``torch.save`` dict, a
safetensors file) is a :class:`CheckpointError` naming the file and what was expected, never a raw
``UnpicklingError`` / ``EOFError`` / ``KeyError`` from deep inside torch or Lightning.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

# What every Lightning training checkpoint holds (Trainer.save_checkpoint).
REQUIRED_KEYS = ("state_dict", "global_step", "pytorch-lightning_version")


class CheckpointError(ValueError):
    """The file is not a readable training checkpoint."""


def load_training_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint dict of the Lightning training checkpoint ``path``; :class:`CheckpointError` if the file is
    empty, unreadable or not a Lightning checkpoint, FileNotFoundError if it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    expected = "expected a Lightning training checkpoint as written by train.py (runs/<run_name>/checkpoints/*.ckpt)"
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is an empty file; {expected}")
    # torch.save has written zip archives since torch 1.6; anything else would go to torch's legacy unpickler, which
    # reads arbitrary bytes as sizes (about 1 random file in 100 ended in a MemoryError or OverflowError there).
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is not a torch.save archive (corrupt, truncated or another "
                              f"format); {expected}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, UnicodeDecodeError, ValueError,
            AttributeError, ModuleNotFoundError, ImportError, IndexError, TypeError, KeyError, OverflowError,
            MemoryError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise CheckpointError(f"checkpoint {path} cannot be read (corrupt or truncated?): {type(err).__name__}: "
                              f"{first}; {expected}") from err
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_KEYS):
        keys = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"checkpoint {path} is not a Lightning training checkpoint (it holds {keys}; a "
                              f"training checkpoint has {list(REQUIRED_KEYS)}); {expected}. For published weights "
                              "use eval.py --model NAME --pretrained")
    return checkpoint
