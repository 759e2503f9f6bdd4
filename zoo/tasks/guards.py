"""Divergence is an error: a training loss that turns NaN / inf stops the run, and weights that are not finite are
never evaluated.

:class:`NonFiniteLossGuard` keeps a device-side flag ``any loss so far was not finite`` (no host sync per step) and
reads it every ``check_every_n_steps`` steps and before every checkpoint write, so the last checkpoint on disk is
always one from before the divergence.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard(Callback):
    """Stop training with :class:`NonFiniteLossError` once a training loss is NaN or infinite.

    ``check_every_n_steps``: how often the device-side flag is read on the host (each read is a device sync);
    checkpoint writes read it too (:meth:`check`), so no checkpoint holds diverged weights."""

    def __init__(self, check_every_n_steps: int = 10) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self._bad: Optional[torch.Tensor] = None  # bool [] on the loss's device: a non-finite loss was seen
        self._first_bad_step: Optional[torch.Tensor] = None  # long []: the first such step (-1: none)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        bad = ~torch.isfinite(loss.detach()).all()
        if self._bad is None or self._bad.device != bad.device:
            self._bad = torch.zeros((), dtype=torch.bool, device=bad.device)
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=bad.device)
        step = trainer.global_step - 1  # the optimiser step this loss belongs to (already taken)
        self._first_bad_step = torch.where(bad & ~self._bad, torch.full_like(self._first_bad_step, step),
                                           self._first_bad_step)
        self._bad |= bad
        if trainer.global_step % self.check_every_n_steps == 0:
            self.check(trainer)

    def check(self, trainer: Optional[L.Trainer] = None) -> None:
        """Raise :class:`NonFiniteLossError` if a non-finite loss was seen (one host sync)."""
        if self._bad is not None and bool(self._bad):
            step = int(self._first_bad_step) if self._first_bad_step is not None else -1
            raise NonFiniteLossError(
                f"the training loss became non-finite (NaN or inf) at step {step}; training stopped. The last "
                "checkpoint written before that is kept (resume from it with --ckpt_path last after fixing the cause: "
                "usually a too-high learning rate (--model.lr), no gradient clipping, or fp16 overflow)")


def nonfinite_parameters(module: nn.Module, limit: int = 5) -> list[str]:
    """Names of (at most ``limit``) parameters / buffers of ``module`` holding NaN or inf values."""
    bad = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad
