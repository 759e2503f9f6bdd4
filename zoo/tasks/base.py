"""What every zoo task (LightningModule) shares, so that ``train.py`` / ``eval.py`` drive any of them alike.

:class:`ZooTask` is the base of :class:`~zoo.tasks.ImageClassificationTask` and
:class:`~zoo.tasks.contrastive.ContrastiveTask`. The command-line tools use only these hooks, never a task's name:

- :meth:`ZooTask.adapt_to_datamodule`: take the input / output geometry from the datamodule (``train.py`` calls it
  right after instantiating, so the model is built for the data before any summary or checkpoint; ``setup`` calls
  it again under a bare ``Trainer``); tasks implement :meth:`ZooTask.take_from_datamodule`;
- :meth:`ZooTask.write_test_plots`: PNG plots of the last test pass;
- :meth:`ZooTask.set_eval_overrides`: eval-time routing (capacity factor, top-k, dropless);
- ``start_global_step``: the step training (re)started from (differs from 0 after a resume);
- checkpoints record the task class, the datamodule (class path + init args) and the trainer precision / threads
  (:meth:`on_save_checkpoint`), so ``eval.py`` needs only the checkpoint (:func:`task_class_of`).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from zoo.moe import MoELayer, set_eval_overrides
from zoo.tasks.optim import DecayName, OptimizerName, RecipeOptimizerMixin

# Checkpoint keys written by ZooTask.on_save_checkpoint (zoo.tasks.publish reads the datamodule / trainer ones too).
TASK_KEY = "zoo_task"
DATAMODULE_KEY = "zoo_datamodule"
TRAINER_KEY = "zoo_trainer"


def moe_layer_names(model: nn.Module) -> list[str]:
    """Short names of the MoE layers of ``model`` in forward order: ``"block<i>"`` for ``...blocks.<i>.mlp``
    (else the module path with dots replaced by ``_``)."""
    names = []
    for path, module in model.named_modules():
        if isinstance(module, MoELayer):
            m = re.search(r"blocks\.(\d+)", path)
            names.append(f"block{m.group(1)}" if m else path.replace(".", "_"))
    return names


def fill_from_datamodule(given: MutableMapping[str, Any], keys: Iterable[str], datamodule: Any, config: Any,
                         where: str) -> bool:
    """For each of ``keys`` the datamodule has (not None): set ``given[key]`` from it when unset, else check that
    the two agree (ValueError naming ``where``, e.g. ``"model"`` or ``"model_overrides"``). Returns whether the
    model ``config`` differs from the filled values (the model must be rebuilt)."""
    rebuild = False
    for key in keys:
        want = getattr(datamodule, key, None)
        if want is None:
            continue
        if given.get(key) is None:
            rebuild |= getattr(config, key, None) != want
            given[key] = int(want)
        elif int(given[key]) != int(want):
            raise ValueError(f"{where} {key}={given[key]} but the datamodule {type(datamodule).__name__} has "
                             f"{key}={want}; drop the explicit {key} (it is taken from the data) or change the data "
                             "settings")
    return rebuild


def class_path(obj: Any) -> str:
    """``module.QualName`` of ``obj``'s class (what LightningCLI's ``class_path`` takes)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


LEGACY_TASK_CLASS_PATH = "zoo.tasks.classification.ImageClassificationTask"


def task_class_of(checkpoint: dict[str, Any]) -> type["ZooTask"]:
    """The task class that wrote ``checkpoint``; ValueError for a checkpoint no zoo task wrote."""
    path = (checkpoint.get(TASK_KEY) or {}).get("class_path")
    if not path and TRAINER_KEY in checkpoint:
        # Before the task was recorded only image classification wrote checkpoints (with TRAINER_KEY): resolved by
        # its class path like any recorded task, so this base module never imports a task built on it.
        path = LEGACY_TASK_CLASS_PATH
    if not path:
        raise ValueError("the checkpoint was not written by a zoo task (it records no zoo.tasks.base.ZooTask "
                         "subclass); eval.py evaluates checkpoints of zoo tasks only")
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"the checkpoint was written by task {path!r}, which cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, ZooTask)):
        raise ValueError(f"the checkpoint's task {path!r} is not a zoo task (zoo.tasks.base.ZooTask)")
    return cls


# The eval-time routing keys every task takes (None = as in training), written into each MoE layer's config.
EVAL_ROUTING_KEYS = ("eval_capacity_factor", "eval_top_k", "eval_dropless")


class ZooTask(RecipeOptimizerMixin, L.LightningModule):
    """Base of the zoo's tasks: the init args every task shares, the hyper-parameters, the recipe optimiser
    (:class:`RecipeOptimizerMixin`); the network is ``self.model``.

    A task's ``__init__`` takes its own arguments plus ``**shared`` and calls ``super().__init__(**shared)``: the
    shared arguments are declared once, here, and the CLI still takes them flat (``--model.lr``; jsonargparse
    follows ``**shared`` into this signature). ``__init__`` records the task's init args as hyper-parameters
    (no ``save_hyperparameters()`` in the task), with the optimiser group resolved against the task's
    ``optimizer_defaults``, so ``hparams`` holds every value the run used.

    Args:
        optimizer, lr, betas, eps, weight_decay, warmup_steps, lr_decay, min_lr_ratio, total_steps, lr_scale: the
            :class:`~zoo.tasks.optim.OptimizerConfig` fields. ``optimizer``, ``lr``, ``warmup_steps`` and
            ``lr_decay`` have one default for every task, given here with their plain types (so the CLI's type
            errors name them simply); the others are None = the task's default (``optimizer_defaults``), which a
            task sets where its recipe differs (betas, eps, weight decay, final LR ratio).
        eval_capacity_factor, eval_top_k, eval_dropless: eval-time routing written into the model's MoE configs
            (:func:`zoo.moe.set_eval_overrides`, :meth:`apply_eval_routing`); None = as in training.
    """

    def __init__(
        self,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        betas: Optional[tuple[float, float]] = None,
        eps: Optional[float] = None,
        weight_decay: Optional[float] = None,
        warmup_steps: int = 100,
        lr_decay: DecayName = "cosine",
        min_lr_ratio: Optional[float] = None,
        total_steps: Optional[int] = None,
        lr_scale: Optional[dict[str, float]] = None,
        eval_capacity_factor: Optional[float] = None,
        eval_top_k: Optional[int] = None,
        eval_dropless: Optional[bool] = None,
    ) -> None:
        super().__init__()
        given = dict(optimizer=optimizer, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                     warmup_steps=warmup_steps, lr_decay=lr_decay, min_lr_ratio=min_lr_ratio, total_steps=total_steps,
                     lr_scale=lr_scale)
        optim = self.optimizer_defaults.updated(given)  # validates: a bad value fails here, not at fit
        # The calling task's init args (every subclass __init__ up the call), then the resolved shared group.
        self.save_hyperparameters(frame=inspect.currentframe().f_back)
        self.save_hyperparameters({**dict(self.hparams), **optim.as_dict(),
                                   "eval_capacity_factor": eval_capacity_factor, "eval_top_k": eval_top_k,
                                   "eval_dropless": eval_dropless})
        self.start_global_step: Optional[int] = None
        # class names recorded in a loaded checkpoint (for plots when no datamodule is attached)
        self.checkpoint_class_names: list[str] = []

    def apply_eval_routing(self, model: nn.Module) -> None:
        """Write the hyper-parameters' eval-time routing into ``model``'s MoE configs (tasks call it on every
        model they build)."""
        hp = self.hparams
        set_eval_overrides(model, capacity_factor=hp.get("eval_capacity_factor"), top_k=hp.get("eval_top_k"),
                           dropless=hp.get("eval_dropless"))

    # ------------------------------------------------------------------------------------------ data
    def attached_datamodule(self) -> Optional[L.LightningDataModule]:
        """The datamodule of the trainer this task runs under, if any."""
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def adapt_to_datamodule(self, datamodule: Any) -> None:
        """Take what the task needs to know from ``datamodule`` (:meth:`take_from_datamodule`) and record the
        resulting hyper-parameters as the initial ones. Idempotent: ``train.py`` calls it right after
        instantiating, :meth:`setup` again."""
        self.take_from_datamodule(datamodule)
        # Values taken from the data count as if passed to __init__: Lightning refuses to log when a key of the
        # initial hparams (e.g. image_size=None) differs from the datamodule's (image_size=8).
        self.save_hyperparameters(dict(self.hparams))

    def take_from_datamodule(self, datamodule: Any) -> None:
        """Task-specific part of :meth:`adapt_to_datamodule` (e.g. image size, number of classes, rebuilding the
        model if they change it). The default takes nothing."""

    def setup(self, stage: str) -> None:
        dm = self.attached_datamodule()
        if dm is not None:
            self.adapt_to_datamodule(dm)

    # ------------------------------------------------------------------------------------- evaluation
    def set_eval_overrides(self, capacity_factor: Optional[float] = None, top_k: Optional[int] = None,
                           dropless: Optional[bool] = None) -> None:
        """Change eval-time routing after construction (e.g. on a loaded checkpoint); recorded in hparams."""
        set_eval_overrides(self.model, capacity_factor=capacity_factor, top_k=top_k, dropless=dropless)
        for key, value in zip(EVAL_ROUTING_KEYS, (capacity_factor, top_k, dropless)):
            if value is not None:
                self.hparams[key] = value

    def cross_process_sum(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """A function summing a CPU tensor over the processes of the run (for :meth:`RoutingReport.summary`), or
        None in a single process."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return None
        strategy = self.trainer.strategy

        def reduce(t: torch.Tensor) -> torch.Tensor:
            return strategy.reduce(t.to(self.device), reduce_op="sum").cpu()
        return reduce

    def log_losses_and_routing(self, split: str, loss: torch.Tensor, ce: torch.Tensor, aux: torch.Tensor,
                               out: Any, batch_size: int) -> None:
        """What every task logs per step: ``{split}/loss`` (on the progress bar), ``/ce``, ``/aux_loss``, each
        ``/aux/<loss>`` of ``out.aux_losses``, and per MoE layer ``{split}/moe/<layer>/dropped``, ``max_share``,
        ``min_share`` (and ``capacity`` where capacity applies) from ``out.routing``. Per step in training, as
        epoch means (weighted by ``batch_size``, synced across processes) otherwise."""
        on_step = split == "train"
        log = dict(on_step=on_step, on_epoch=not on_step, batch_size=batch_size, sync_dist=not on_step)
        self.log(f"{split}/loss", loss, prog_bar=True, **log)
        self.log(f"{split}/ce", ce, **log)
        self.log(f"{split}/aux_loss", aux, **log)
        for name, value in out.aux_losses.items():
            self.log(f"{split}/aux/{name}", value.detach().float(), **log)
        for name, stats in zip(self.layer_names, out.routing):
            tpe = stats.tokens_per_expert.float()
            share = tpe / tpe.sum().clamp_min(1e-12)
            prefix = f"{split}/moe/{name}"
            self.log(f"{prefix}/dropped", stats.dropped_fraction.float(), **log)
            self.log(f"{prefix}/max_share", share.max(), **log)
            self.log(f"{prefix}/min_share", share.min(), **log)
            if stats.capacity is not None:
                self.log(f"{prefix}/capacity", float(stats.capacity), **log)

    def write_test_plots(self, out_dir: str | Path, title: str = "",
                         class_names: Optional[list[str]] = None) -> list[str]:
        """PNG plots of the last test pass into ``out_dir``; returns their paths. ``title`` names the run or
        evaluation; ``class_names`` label class-indexed plots (default: the attached datamodule's, else the
        checkpoint's). The default writes nothing."""
        return []

    def class_names_for_plots(self, class_names: Optional[list[str]] = None) -> list[str]:
        """``class_names`` if given, else the attached datamodule's, else those recorded in the checkpoint."""
        if class_names:
            return list(class_names)
        dm = self.attached_datamodule()
        return list(getattr(dm, "class_names", None) or self.checkpoint_class_names or [])

    # ---------------------------------------------------------------------------------------- steps
    def on_train_start(self) -> None:
        # After a resumed checkpoint's loop state is restored (on_fit_start is too early): where training restarts.
        self.start_global_step = int(self.trainer.global_step)

    # ---------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the task class, how to rebuild the datamodule and the precision, so ``eval.py`` needs only the
        checkpoint."""
        checkpoint[TASK_KEY] = {"class_path": class_path(self)}
        dm = self.attached_datamodule()
        if dm is not None:
            init_args = {k: v for k, v in dict(getattr(dm, "hparams", {}) or {}).items() if not k.startswith("_")}
            checkpoint[DATAMODULE_KEY] = {
                "class_path": class_path(dm),
                "init_args": init_args,
                "class_names": list(getattr(dm, "class_names", None) or []),
            }
        if self._trainer is not None:
            checkpoint[TRAINER_KEY] = {"precision": str(self.trainer.precision),
                                       "num_threads": torch.get_num_threads()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.checkpoint_class_names = list((checkpoint.get(DATAMODULE_KEY) or {}).get("class_names") or [])
        self._check_checkpoint_tensors(checkpoint.get("state_dict"))

    def _check_checkpoint_tensors(self, saved: Any) -> None:
        """A checkpoint written by another model (the recipe or the model settings changed since, e.g. LoRA added,
        a preset swapped) is a :class:`~zoo.tasks.checkpoints.CheckpointError` that says what differs and how to go
        on, before Lightning's strict load fails with every missing and unexpected name in one line. Runs before
        the weights load (resuming ``--ckpt_path last``, ``eval.py --checkpoint``)."""
        from zoo.tasks.checkpoints import CheckpointError

        if not isinstance(saved, MutableMapping) or not getattr(self, "strict_loading", True):
            return
        own = self.state_dict()
        if not own:  # a model built lazily, after the weights load: Lightning's own check applies
            return
        missing = sorted(set(own) - set(saved))
        unexpected = sorted(set(saved) - set(own))
        reshaped = sorted(k for k in set(own) & set(saved) if isinstance(saved[k], torch.Tensor)
                          and tuple(saved[k].shape) != tuple(own[k].shape))
        if not (missing or unexpected or reshaped):
            return
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) this model has are not in it (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) in it this model does not have "
                         f"(e.g. {', '.join(unexpected[:3])})")
        if reshaped:
            k = reshaped[0]
            parts.append(f"{len(reshaped)} tensor(s) of another shape (e.g. {k}: checkpoint "
                         f"{list(saved[k].shape)}, model {list(own[k].shape)})")
        raise CheckpointError("the checkpoint was written by a different model than the one these settings build: "
                              + "; ".join(parts) + ". The recipe or the model settings changed since it was "
                              "written: start the run again (--overwrite true), choose another --run_name, or "
                              "restore the settings it was trained with")
