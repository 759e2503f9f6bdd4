"""Optimiser pieces of the training recipes: weight-decay parameter groups and the warmup + decay schedule.

Kept free of Lightning so every task (classification now, contrastive / language later) shares them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from zoo.moe.experts import StackedExperts

OptimizerName = Literal["adamw", "adam"]
DecayName = Literal["cosine", "linear", "constant"]

# Parameters (by their last name component) that never get weight decay: position / class embeddings and the
# learned prefix tokens of every family. Biases, norm scales and anything else with ndim <= 1 are caught by shape.
NO_DECAY_NAMES: frozenset[str] = frozenset(
    {"pos_embed", "cls_token", "position_embedding", "positional_embedding", "class_embedding", "reg_token"}
)


def is_no_decay(name: str, param: nn.Parameter, module: nn.Module, extra: Iterable[str] = ()) -> bool:
    """True for parameters that get no weight decay: ndim <= 1 (norm scales, biases), biases of any shape
    (``*.bias`` and the stacked experts' ``b1`` / ``b2`` [E, H]), position / class embeddings
    (:data:`NO_DECAY_NAMES` plus ``extra``), and the weights of ``nn.Embedding`` / normalisation layers.

    ``name`` is the parameter's full name, ``module`` the module that owns it directly."""
    leaf = name.rsplit(".", 1)[-1]
    if param.ndim <= 1 or leaf == "bias" or leaf in NO_DECAY_NAMES or name in set(extra) or leaf in set(extra):
        return True
    if isinstance(module, StackedExperts) and leaf in ("b1", "b2"):
        return True
    norms = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding)
    if isinstance(module, norms) or type(module).__name__.lower().endswith("norm"):
        return True
    return False


def split_decay_params(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(decay names, no-decay names)`` of ``model``'s trainable parameters (see :func:`is_no_decay`).

    A model may add names with a timm-style ``no_weight_decay()`` method returning a set of names."""
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for mod_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            (no_decay if is_no_decay(name, param, module, extra) else decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimiser groups: ``weight_decay`` for matrices / kernels, 0 for the rest (:func:`split_decay_params`).
    Each group carries its parameter names under ``"names"`` (ignored by torch optimisers, handy in tests)."""
    decay, no_decay = split_decay_params(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay, "names": decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "names": no_decay},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    name: OptimizerName = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW (decoupled decay) or Adam (L2 decay) over :func:`param_groups`."""
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(betas), eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; expected 'adamw' or 'adam'")


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, decay: DecayName = "cosine",
                  min_lr_ratio: float = 0.0) -> float:
    """The learning-rate multiplier used for optimiser step ``step`` (0-based).

    - warmup (``step < warmup_steps``): ``(step + 1) / warmup_steps``, linear, reaching 1 on the last warmup step;
    - then, with ``p = (step - warmup_steps) / max(1, total_steps - warmup_steps)`` clipped to [0, 1]:
      cosine ``r + (1 - r) * (1 + cos(pi * p)) / 2``, linear ``r + (1 - r) * (1 - p)``, or constant ``1``,
      where ``r = min_lr_ratio`` (the final LR as a fraction of the peak).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    p = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if decay == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if decay == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - p)
    raise ValueError(f"unknown lr decay {decay!r}; expected 'cosine', 'linear' or 'constant'")


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    decay: DecayName = "cosine", min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` following :func:`lr_multiplier`."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    lr_multiplier(warmup_steps, warmup_steps, total_steps, decay, min_lr_ratio)  # validates `decay`
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, decay, min_lr_ratio)
    )


class RecipeOptimizerMixin:
    """``configure_optimizers`` of every task: :func:`build_optimizer` + the per-step warmup/decay schedule.

    Mixed into a LightningModule whose hyper-parameters hold ``optimizer, lr, weight_decay, betas, eps,
    warmup_steps, lr_decay, min_lr_ratio, total_steps`` and whose network is ``self.model``.
    """

    def schedule_total_steps(self) -> int:
        if self.hparams.total_steps is not None:
            return int(self.hparams.total_steps)
        est = self.trainer.estimated_stepping_batches
        if est is None or est == float("inf"):
            raise ValueError("cannot infer the LR schedule length: set trainer max_steps or max_epochs, "
                             "or the task's total_steps")
        return max(1, int(est))

    def extra_trainable_modules(self) -> list[nn.Module]:
        """Modules trained alongside ``self.model`` that are not part of it (e.g. a task's own loss head); their
        parameters join the optimiser (same lr, schedule and weight-decay rules). Default: none."""
        return []

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        optimizer = build_optimizer(self.model, hp.optimizer, hp.lr, hp.weight_decay, tuple(hp.betas), hp.eps)
        for module in self.extra_trainable_modules():
            for group in param_groups(module, hp.weight_decay):
                optimizer.add_param_group(group)
        scheduler = build_scheduler(optimizer, hp.warmup_steps, self.schedule_total_steps(), hp.lr_decay,
                                    hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
