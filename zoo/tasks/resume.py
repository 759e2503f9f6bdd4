"""Exact resume: a run killed at any step and resumed from its last checkpoint ends with the weights of the run
that was never interrupted (bit for bit on CPU).

What decides the rest of a run, and where it is kept:

- weights, optimiser and LR-schedule state, step and epoch counters: Lightning's checkpoint;
- the data order and augmentation: a function of ``(seed, epoch, position)``; the datamodule's ``state_dict``
  records the position (:class:`zoo.data.base.SplitDataModule`, :mod:`zoo.data.sampling`);
- the random numbers of each training step (dropout, router noise, patch / word dropout): :class:`SeedEachStep`
  reseeds torch's generators from ``(seed, epoch, batch index)`` before every training batch, so they do not depend
  on what ran before in the process (validation, a sanity check, a restart);
- ``metrics.csv``: a resumed run drops the rows the killed run logged after its checkpoint
  (:func:`truncate_metrics_csv`), so the file and the curves never mix the two runs.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from zoo.data.sampling import derive_seed


class SeedEachStep(Callback):
    """Before every training batch, seed torch's CPU and CUDA generators from ``(seed, epoch, batch_idx)``.

    ``seed``: None takes the run's ``seed_everything`` seed (``PL_GLOBAL_SEED``, else 0) at fit start; the seed is
    saved in checkpoints and a resumed run keeps it. Seeding is a host-side call (no device sync)."""

    def __init__(self, seed: Optional[int] = None) -> None:
        self.seed = seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        torch.manual_seed(derive_seed(self.seed or 0, trainer.current_epoch, batch_idx))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])


def truncate_metrics_csv(path: str | os.PathLike, before_step: int) -> int:
    """Keep only the rows of the CSV log ``path`` with ``step < before_step`` (atomic rewrite); returns how many
    rows were dropped. Used when a run resumes from a checkpoint at ``before_step``: the rows the killed run
    logged after that checkpoint are replayed by the resumed run."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    kept = [r for r in rows if r.get("step") in (None, "") or int(float(r["step"])) < before_step]
    if len(kept) == len(rows):
        return 0
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)
    return len(rows) - len(kept)


def first_logged_step(checkpoint: dict[str, Any]) -> int:
    """The logger step of the first row a run resumed from ``checkpoint`` logs: the number of optimiser steps
    done (Lightning's ``_batches_that_stepped``, which it advances by one on restart)."""
    return int(checkpoint.get("global_step", 0))
