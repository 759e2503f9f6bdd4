"""Progress lines for runs without a progress bar (``trainer.enable_progress_bar: false``, e.g. the LIMoE recipes,
which run 15-20 minutes on a CPU and write logs where a bar would be noise): one line on stderr after every
training epoch, with the step, the time per epoch, an estimate of the time left and the epoch's logged metrics."""

from __future__ import annotations

import math
import sys
from time import monotonic
from typing import Any, Optional, TextIO

import torch
from lightning.pytorch import Callback, Trainer

# The metrics shown (when logged), in this order; the line stays short.
SHOWN_METRICS = ("train/loss", "val/loss", "val/acc", "val/zero_shot_acc", "val/i2t_R@1", "val/perplexity")


def _format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class EpochProgressLog(Callback):
    """After each training epoch (its validation included), when the trainer has no progress bar, prints
    ``[prog] epoch 3/240 · step 411 · 3.1 s/epoch · ~12.3 min left · train/loss 1.234 · val/acc 0.91``."""

    def __init__(self, prog: str = "train.py", stream: Optional[TextIO] = None) -> None:
        self.prog = prog
        self.stream = stream
        self._fit_start: Optional[float] = None
        self._start_epoch = 0

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._fit_start = monotonic()
        self._start_epoch = trainer.current_epoch  # a resumed run times only its own epochs

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.progress_bar_callback is not None or not trainer.is_global_zero or self._fit_start is None:
            return
        done = trainer.current_epoch + 1
        elapsed = monotonic() - self._fit_start
        per_epoch = elapsed / max(1, done - self._start_epoch)
        parts = [f"epoch {done}/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0
                 else f"epoch {done}", f"step {trainer.global_step}", f"{per_epoch:.1f} s/epoch"]
        left = self._epochs_left(trainer, done)
        if left is not None:
            parts.append(f"~{_format_duration(left * per_epoch)} left")
        for name in SHOWN_METRICS:
            value = trainer.callback_metrics.get(name)
            if value is None:
                value = trainer.callback_metrics.get(f"{name}_epoch")
            if isinstance(value, torch.Tensor) and value.numel() == 1 and math.isfinite(float(value)):
                parts.append(f"{name} {float(value):.4g}")
        print(f"[{self.prog}] " + " · ".join(parts), file=self.stream or sys.stderr, flush=True)

    @staticmethod
    def _epochs_left(trainer: Trainer, done: int) -> Optional[float]:
        """Epochs still to run: from max_steps when it stops first, else max_epochs (None when unbounded)."""
        candidates = []
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            candidates.append(trainer.max_epochs - done)
        batches = trainer.num_training_batches
        steps_per_epoch = batches / max(1, trainer.accumulate_grad_batches) if math.isfinite(batches) else 0
        if trainer.max_steps > 0 and steps_per_epoch > 0:
            candidates.append((trainer.max_steps - trainer.global_step) / steps_per_epoch)
        return max(0.0, min(candidates)) if candidates else None
