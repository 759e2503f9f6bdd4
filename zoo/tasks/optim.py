"""Optimiser pieces of the training recipes: the settings every task shares (:class:`OptimizerConfig`),
weight-decay parameter groups and the warmup + decay schedule.

Kept free of Lightning so every task (classification, contrastive, language) shares them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Optional, get_args

import torch
from torch import nn

from zoo.moe.experts import StackedExperts

OptimizerName = Literal["adamw", "adam"]
DecayName = Literal["cosine", "linear", "constant"]



@dataclass(frozen=True)
class OptimizerConfig:
    """The optimiser and LR schedule of a training recipe, the one group every task shares.

    Tasks take these fields as flat init args (``--model.lr``, ``model.init_args.lr`` in a recipe; see
    :class:`zoo.tasks.base.ZooTask`), each task with its own defaults (``ZooTask.optimizer_defaults``).

    optimizer: ``"adamw"`` (decoupled weight decay) or ``"adam"`` (L2). Norms, biases and position / class
        embeddings never get weight decay (:func:`is_no_decay`).
    lr: peak learning rate. betas, eps, weight_decay: optimiser settings.
    warmup_steps: linear warmup (in optimiser steps), then ``lr_decay`` ("cosine", "linear", "constant") to
        ``min_lr_ratio * lr`` at the end of training; stepped every optimiser step.
    total_steps: steps of the schedule; ``None`` = the Trainer's estimate (``max_steps`` / ``max_epochs``).
    lr_scale: ``{parameter group: factor}``: that group's peak learning rate is ``factor * lr`` (same warmup and
        decay), e.g. ``{"vision_tower": 0.1}`` for a tower that trains beside a decoder from scratch. Group names
        are the model's freeze groups (:func:`zoo.models.freeze.param_groups`: ``vision_tower``, ``projector``,
        ``attention``, ``experts``, ...); an unknown name is an error. None = one learning rate for all.
    """

    optimizer: OptimizerName = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_steps: int = 100
    lr_decay: DecayName = "cosine"
    min_lr_ratio: float = 0.0
    total_steps: Optional[int] = None
    lr_scale: Optional[Mapping[str, float]] = None

    def __post_init__(self) -> None:
        if self.lr_scale is not None:
            if not isinstance(self.lr_scale, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and v > 0 for k, v in self.lr_scale.items()):
                raise ValueError(f"lr_scale must map parameter group names to factors > 0, e.g. "
                                 f"{{'vision_tower': 0.1}}, got {self.lr_scale!r}")
            object.__setattr__(self, "lr_scale", {k: float(v) for k, v in self.lr_scale.items()})
        if self.optimizer not in get_args(OptimizerName):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected 'adamw' or 'adam'")
        if self.lr_decay not in get_args(DecayName):
            raise ValueError(f"unknown lr decay {self.lr_decay!r}; expected 'cosine', 'linear' or 'constant'")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(tuple(self.betas)) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ValueError(f"need eps > 0 and weight_decay >= 0, got eps={self.eps}, weight_decay={self.weight_decay}")
        if self.warmup_steps < 0 or (self.total_steps is not None and self.total_steps < 1):
            raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1 (or None), got {self.warmup_steps} and "
                             f"{self.total_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        object.__setattr__(self, "betas", tuple(self.betas))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def updated(self, values: Mapping[str, Any]) -> "OptimizerConfig":
        """A copy with the fields ``values`` gives (keys that are not fields and None values are ignored: None
        means "the default")."""
        return replace(self, **{k: values[k] for k in self.names() if values.get(k) is not None})

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.names()}


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

    A model may add names with a timm-style ``no_weight_decay()`` method returning a set of names. A parameter
    shared by several modules (tied input / output embeddings) appears once, under the name
    ``model.named_parameters()`` gives it, and gets no decay if any of its owners says so (an embedding)."""
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    no_decay_ids: set[int] = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for leaf, param in module.named_parameters(recurse=False):
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            if is_no_decay(name, param, module, extra):
                no_decay_ids.add(id(param))
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # each tensor once
        if param.requires_grad:
            (no_decay if id(param) in no_decay_ids else decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float, lr: Optional[float] = None,
                 lr_scale: Optional[Mapping[str, float]] = None) -> list[dict]:
    """Two optimiser groups: ``weight_decay`` for matrices / kernels, 0 for the rest (:func:`split_decay_params`).
    Each group carries its parameter names under ``"names"`` (ignored by torch optimisers, handy in tests).

    With ``lr_scale`` (:class:`OptimizerConfig`), the parameters of each named freeze group get their own pair of
    groups with ``"lr": factor * lr`` and the group name under ``"lr_group"``."""
    decay, no_decay = split_decay_params(model)
    params = dict(model.named_parameters())
    scale_of: dict[str, str] = {}
    if lr_scale:
        from zoo.models.freeze import param_groups as freeze_groups

        known = freeze_groups(model)
        unknown = sorted(set(lr_scale) - set(known))
        if unknown:
            raise ValueError(f"lr_scale names {unknown}, which are not parameter groups of this model; its groups "
                             f"are {sorted(known)}")
        if lr is None:
            raise ValueError("lr_scale needs the peak lr to scale")
        scale_of = {name: group for group in lr_scale for name, _ in known[group]}
    groups = []
    for group in [None, *(lr_scale or {})]:
        for names, wd in ((decay, weight_decay), (no_decay, 0.0)):
            chosen = [n for n in names if scale_of.get(n) == group]
            if not chosen:
                continue
            entry = {"params": [params[n] for n in chosen], "weight_decay": wd, "names": chosen}
            if group is not None:
                entry.update(lr=lr * lr_scale[group], lr_group=group)
            groups.append(entry)
    return groups


def build_optimizer(
    model: nn.Module,
    name: OptimizerName = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    lr_scale: Optional[Mapping[str, float]] = None,
) -> torch.optim.Optimizer:
    """AdamW (decoupled decay) or Adam (L2 decay) over :func:`param_groups`."""
    groups = param_groups(model, weight_decay, lr, lr_scale)
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

    Mixed into a LightningModule whose hyper-parameters hold the :class:`OptimizerConfig` fields and whose network
    is ``self.model``.
    """

    # The task's defaults for the fields a recipe does not set (a task class overrides it).
    optimizer_defaults: OptimizerConfig = OptimizerConfig()

    def optimizer_config(self) -> OptimizerConfig:
        """The recipe's optimiser settings, read from the hyper-parameters (changes to them count)."""
        return self.optimizer_defaults.updated(self.hparams)

    def schedule_total_steps(self) -> int:
        total = self.optimizer_config().total_steps
        if total is not None:
            return int(total)
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
        cfg = self.optimizer_config()
        optimizer = build_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps,
                                    cfg.lr_scale)
        for module in self.extra_trainable_modules():
            for group in param_groups(module, cfg.weight_decay):
                optimizer.add_param_group(group)
        scheduler = build_scheduler(optimizer, cfg.warmup_steps, self.schedule_total_steps(), cfg.lr_decay,
                                    cfg.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
