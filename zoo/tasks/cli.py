"""The training command line (``train.py``): LightningCLI with the zoo's run layout, for any task.

    python train.py                                    # the default recipe, configs/train/vmoe_digits.yaml
    python train.py --config configs/train/vmoe_mnist.yaml --trainer.max_epochs=5 --data.batch_size=256
    python train.py --config configs/train/limoe_mnist.yaml   # contrastive LIMoE: any LightningModule works
    python train.py --ckpt_path last                   # resume the run from runs/<run_name>/checkpoints/last.ckpt
    python train.py --overwrite true                   # start the run again, deleting its old checkpoints/metrics

``model`` and ``data`` take any LightningModule / LightningDataModule by ``class_path`` (LightningCLI subclass
mode); a ``model:`` section without ``class_path`` means :class:`~zoo.tasks.ImageClassificationTask` (the V-MoE
recipes use that short form). ``--model.<arg>`` / ``--data.<arg>`` override the chosen class's arguments.

A run writes ``<root>/runs/<run_name>/`` (root = ``--trainer.default_root_dir``, else the working directory):
``checkpoints/last.ckpt`` (atomic writes every ``checkpoint.every_n_train_steps`` steps and after the last batch;
none with ``trainer.enable_checkpointing: false``), ``metrics.csv`` +
``hparams.yaml`` (CSVLogger), ``config.yaml`` (the full resolved config), ``test_metrics.json`` and ``plots/``.
The last stdout line is one JSON object with the test metrics.

Resuming (``--ckpt_path``) is exact: a run killed at any step and resumed ends with the uninterrupted run's weights
(bit for bit on CPU; :mod:`zoo.tasks.resume`), and ``metrics.csv`` loses the rows logged after the checkpoint. A new
run into a folder that holds one is refused unless ``--overwrite true``. A corrupt checkpoint, a non-finite loss
(:mod:`zoo.tasks.guards`) and bad argument values are one-line errors.

Task hooks used when the task has them (:class:`zoo.tasks.base.ZooTask` has all): ``adapt_to_datamodule`` (right
after instantiation: the model takes its geometry from the data), ``write_test_plots`` (plots of the test pass),
``start_global_step`` and ``test_routing`` (into the summary).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from zoo.config import ConfigError
from zoo.data.base import SplitDataModule
from zoo.registry import configs_dir
from zoo.tasks.checkpoints import CheckpointError, load_training_checkpoint
from zoo.tasks.guards import NonFiniteLossError, NonFiniteLossGuard
from zoo.tasks.progress import EpochProgressLog
from zoo.tasks.quiet import quiet_library_notices
from zoo.tasks.resume import SeedEachStep, truncate_metrics_csv

DEFAULT_RECIPE = "vmoe_digits"
# The task of a `model:` section without class_path (the V-MoE recipes' short form).
DEFAULT_TASK = "zoo.tasks.ImageClassificationTask"


def default_config_path() -> Path:
    """``configs/train/vmoe_digits.yaml`` of the project (found from the package, so any cwd works)."""
    return configs_dir() / "train" / f"{DEFAULT_RECIPE}.yaml"


def run_dir(root: Optional[str | os.PathLike], run_name: str) -> Path:
    """``<root>/runs/<run_name>`` (root None = the working directory)."""
    return Path(root if root else os.getcwd()) / "runs" / run_name


def default_checkpoint(root: Optional[str | os.PathLike] = None, run_name: str = DEFAULT_RECIPE) -> Path:
    return run_dir(root, run_name) / "checkpoints" / "last.ckpt"


# Checkpoint interval (optimiser steps) of a recipe that sets none: a killed run loses at most this many steps.
DEFAULT_CHECKPOINT_EVERY_N_STEPS = 100


def refuse_sharded_checkpoints(strategy: Any) -> None:
    """A run folder keeps one checkpoint FILE per save: resuming (and its settings check), ``eval.py``,
    ``init_from: run:NAME`` and publishing read it. A strategy set to write sharded checkpoint folders (Lightning's
    ``ModelParallelStrategy`` by default, ``FSDPStrategy(state_dict_type="sharded")``) is refused before training
    starts, with the setting that writes one file (the full state dict, gathered on rank 0)."""
    sharded = getattr(strategy, "_save_distributed_checkpoint", False)  # ModelParallelStrategy
    sharded = sharded or getattr(strategy, "_state_dict_type", None) == "sharded"  # FSDPStrategy
    if sharded:
        raise ValueError(f"{type(strategy).__name__} is set to write sharded checkpoint folders, but a zoo run keeps "
                         "one checkpoint file per save (resume, eval.py and init_from read it): add "
                         '"save_distributed_checkpoint": false (ModelParallelStrategy) or "state_dict_type": "full" '
                         "(FSDPStrategy) to the strategy's init_args")


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose writes are atomic: each checkpoint goes to a hidden temp file in the same folder,
    is fsync'ed, then ``os.replace``-d over the target, so a run killed at any moment leaves the previous complete
    ``last.ckpt`` (the temp name never matches Lightning's ``last*.ckpt`` lookup). Defaults: ``save_last=True``,
    ``save_top_k=0`` (only ``last.ckpt``; set ``monitor=val/acc``, ``mode=max``, ``save_top_k=1`` to also keep the
    best), no ``last-v1.ckpt`` versions, and a save every :data:`DEFAULT_CHECKPOINT_EVERY_N_STEPS` optimiser steps
    DURING training unless ``every_n_epochs`` or ``train_time_interval`` is given instead (so a killed run has
    something to resume from), plus one when training ends."""

    def __init__(self, dirpath: Optional[str] = None, filename: Optional[str] = None, monitor: Optional[str] = None,
                 verbose: bool = False, save_last: Optional[bool] = True, save_top_k: int = 0,
                 save_weights_only: bool = False, mode: str = "min", auto_insert_metric_name: bool = True,
                 every_n_train_steps: Optional[int] = DEFAULT_CHECKPOINT_EVERY_N_STEPS,
                 train_time_interval: Optional[timedelta] = None, every_n_epochs: Optional[int] = None,
                 save_on_train_epoch_end: Optional[bool] = None, enable_version_counter: bool = False) -> None:
        if every_n_epochs is not None or train_time_interval is not None:
            every_n_train_steps = None  # the three triggers are exclusive; an explicit other one wins
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, verbose=verbose, save_last=save_last,
                         save_top_k=save_top_k, save_weights_only=save_weights_only, mode=mode,
                         auto_insert_metric_name=auto_insert_metric_name, every_n_train_steps=every_n_train_steps,
                         train_time_interval=train_time_interval, every_n_epochs=every_n_epochs,
                         save_on_train_epoch_end=save_on_train_epoch_end,
                         enable_version_counter=enable_version_counter)

    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx: int) -> None:  # noqa: ANN001
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # The interval rarely falls on the last step: save the final state (what test / eval.py read) here, after
        # the last batch, where a checkpoint resumes like any other (one written by on_train_end would start a
        # new epoch when the run is extended, abandoning the rest of the current one).
        last_step = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        last_epoch = (trainer.max_epochs is not None and trainer.max_epochs != -1
                      and trainer.current_epoch + 1 >= trainer.max_epochs and batch_idx + 1 >= trainer.num_training_batches)
        if (last_step or last_epoch) and self.save_last and self._last_global_step_saved != trainer.global_step \
                and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: Trainer, pl_module) -> None:  # noqa: ANN001
        # Training stopped early (early stopping, max_time): save where it stopped.
        if self.save_last and self._last_global_step_saved != trainer.global_step and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        for guard in trainer.callbacks:  # never write diverged weights over the last good checkpoint
            if isinstance(guard, NonFiniteLossGuard):
                guard.check(trainer)
        fs = get_filesystem(filepath)
        if "file" not in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
            return super()._save_checkpoint(trainer, filepath)  # remote storage: its own transactions
        folder, name = os.path.split(os.fspath(filepath))
        tmp = os.path.join(folder, f".{name}.step{trainer.global_step}.partial")  # same name on every rank
        trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, filepath)
        trainer.strategy.barrier("atomic_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            from weakref import proxy

            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:  # noqa: ANN001
        refuse_sharded_checkpoints(trainer.strategy)
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            for stale in Path(self.dirpath).glob(".*.partial"):  # left by a run killed mid-write
                stale.unlink(missing_ok=True)


class _AppendingExperimentWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (and its columns) instead of deleting it: used when resuming a run."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            import csv

            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))


class RunCSVLogger(CSVLogger):
    """CSVLogger writing ``<save_dir>/<name>/metrics.csv``; ``append=True`` (resume) keeps the earlier rows."""

    def __init__(self, save_dir: str | os.PathLike, name: str, append: bool = False,
                 flush_logs_every_n_steps: int = 10) -> None:
        super().__init__(save_dir=save_dir, name=name, version="", flush_logs_every_n_steps=flush_logs_every_n_steps)
        self._append = append

    @property
    def log_dir(self) -> str:
        return self.root_dir

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self._append:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return super().experiment


# jsonargparse reports a bad argument of a class chosen by class_path as a failed Union match, with every subtype
# tried and the raw value; this pulls out the one line that matters (group, class, what is wrong).
_SUBCLASS_ERROR = re.compile(
    r'Parser key "(?P<key>[\w.]+)":.*?Problem with given class_path \'(?P<cls>[^\']+)\':\n(?P<inner>.*?)'
    r'\n\s*- Expected a <class \'NoneType\'>.*?Given value type: <class \'(?P<given>[\w.]+)\'>', re.S)
# The same failure raised at instantiation (the class's __init__ refused a value): no parser key in the message.
_INIT_ERROR = re.compile(r"Does not validate against any of the Union subtypes\n.*?Errors:\n.*?- Expected a <class "
                         r"'NoneType'>\nGiven value type: .*?class_path='(?P<cls>[^']+)'", re.S)
_NOT_ACCEPTED = re.compile(r"^Option '(?P<opt>[\w.]+)' is not accepted$")


def simplify_subclass_error(message: str, prog: str = "train.py") -> str:
    """One clear line for a subclass-mode argument error (unknown option, bad value, unknown class), e.g.
    ``Group 'model' does not accept option 'lrr' (given as --model.lrr); class zoo.tasks.ImageClassificationTask``;
    any other message is returned unchanged."""
    m = _SUBCLASS_ERROR.search(message)
    if not m:
        return message
    key, cls = m["key"], m["cls"]
    inner = " ".join(line.strip() for line in m["inner"].strip().splitlines())
    from_cli = m["given"].endswith("NestedArg")
    bad = _NOT_ACCEPTED.match(inner)
    if bad:
        where = f"given as --{key}.{bad['opt']}" if from_cli else f"in the config's '{key}:' section"
        return (f"Group '{key}' does not accept option '{bad['opt']}' ({where}); class {cls}. "
                f"Its options: {prog} --{key}.help {cls}")
    return f"Group '{key}' (class {cls}): {inner}"


class ZooArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with subclass-mode errors cut down to the line that matters, and a command-line error
    printed as that line plus where to find the options, without jsonargparse's usage listing of every option
    (55 lines before the error, which scrolled it off the screen)."""

    def error(self, message: str, ex: Optional[Exception] = None):  # noqa: ANN201 (NoReturn in the base)
        prog = Path(self.prog or "train.py").name
        message = simplify_subclass_error(message, prog)
        if not self.exit_on_error or callable(self._error_handler) or _jsonargparse_debug():
            return super().error(message, ex)  # a nested parse or a debug run: jsonargparse's own handling
        self._logger.error(message)
        sys.stderr.write(f"error: {message}\n"
                         f"For the accepted options run: {prog} --help\n")
        self.exit(2)


def _jsonargparse_debug() -> bool:
    try:
        from jsonargparse._common import debug_mode_active
    except ImportError:  # moved in another jsonargparse version: behave as without debug mode
        return False
    return debug_mode_active()


class ZooCLI(LightningCLI):
    """LightningCLI with the zoo's run layout: ``--config``, ``--trainer.*``, ``--model`` / ``--data`` (any
    LightningModule / LightningDataModule by class path; ``model`` defaults to :data:`DEFAULT_TASK`),
    ``--checkpoint.*`` (the atomic checkpoint callback) and top-level ``--run_name``, ``--ckpt_path``,
    ``--num_threads``, ``--test``.

    ``runs_root``: where ``runs/`` goes when ``--trainer.default_root_dir`` is not given (None = working
    directory)."""

    def __init__(self, *args: Any, runs_root: Optional[str | os.PathLike] = None, **kwargs: Any) -> None:
        self.runs_root = runs_root  # before super().__init__: it parses and instantiates
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=Optional[str], default=None,
                            help="Run folder name: <root>/runs/<run_name>. Default: the config file's stem.")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="Resume training: 'last' (this run's last.ckpt) or a checkpoint path.")
        parser.add_argument("--num_threads", type=Optional[int], default=None,
                            help="torch.set_num_threads (CPU intra-op threads); default: torch's choice.")
        parser.add_argument("--test", type=bool, default=True, help="Evaluate on the test split after training.")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="Start a new run in a run folder that already holds one (its checkpoints and "
                                 "metrics are deleted). Without it such a run is refused: resume it with "
                                 "--ckpt_path last, or pick another --run_name.")
        parser.add_lightning_class_args(AtomicModelCheckpoint, "checkpoint")
        parser.set_defaults({"model": {"class_path": DEFAULT_TASK}})

    def _run_name(self) -> str:
        name = self.config.get("run_name")
        if name:
            return name
        configs = self.config.get("config") or []
        return Path(str(configs[-1])).stem if configs else "run"

    def before_instantiate_classes(self) -> None:
        if self.config.get("num_threads"):
            torch.set_num_threads(int(self.config.num_threads))
        self.run_name = self._run_name()
        self.run_dir = run_dir(self.config.trainer.get("default_root_dir") or self.runs_root, self.run_name)
        if self.config.checkpoint.get("dirpath") is None:
            self.config.checkpoint.dirpath = str(self.run_dir / "checkpoints")

    def after_instantiate_classes(self) -> None:
        # The task takes what it needs from the data (image size, classes, ...) now rather than in setup(), so the
        # model is built for the data before anything inspects or saves it. Tasks without the hook are left as is.
        adapt = getattr(self.model, "adapt_to_datamodule", None)
        if callable(adapt) and self.datamodule is not None:
            adapt(self.datamodule)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        logger = self.config_init.trainer.get("logger")
        if logger is None or logger is True:
            resuming = bool(self.config.get("ckpt_path"))
            kwargs["logger"] = RunCSVLogger(self.run_dir.parent, self.run_name, append=resuming)
        if self.config_init.trainer.get("default_root_dir") is None:
            kwargs["default_root_dir"] = str(self.run_dir)
        # LightningCLI.instantiate_trainer, except that a recipe with `enable_checkpointing: false` drops the
        # checkpoint callback (the Trainer refuses a ModelCheckpoint then) instead of failing.
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        if trainer_config.get("enable_checkpointing") is False:
            callbacks = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
        # the random numbers of each step depend on the step only, so a resumed run repeats the killed one exactly
        callbacks.append(SeedEachStep())
        callbacks.append(NonFiniteLossGuard())
        callbacks.append(EpochProgressLog())  # a line per epoch when the recipe turns the progress bar off
        return self._instantiate_trainer(trainer_config, callbacks)


def _has_config_flag(args: list[str]) -> bool:
    return any(a in ("--config", "-c") or a.startswith("--config=") for a in args)


def _check_config_files(args: list[str]) -> None:
    """An empty or non-mapping ``--config`` file is a clear error (jsonargparse says only "Unexpected config:")."""
    import yaml

    for i, arg in enumerate(args):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else None)
        if path is None or not Path(path).is_file():
            continue
        try:
            content = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if content is None:
            raise ConfigError(f"config file {path} is empty; a recipe needs at least its model: and data: sections "
                              f"(see {default_config_path()})")
        if not isinstance(content, dict):
            raise ConfigError(f"config file {path} must be a YAML mapping (model:, data:, trainer: ...), "
                              f"got a {type(content).__name__}")


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def build_cli(args: Optional[list[str]] = None, cli_class: type[ZooCLI] = ZooCLI,
              runs_root: Optional[str | os.PathLike] = None) -> ZooCLI:
    """Parse ``args`` (default ``sys.argv[1:]``; the default recipe when no ``--config`` is given) and instantiate
    the model, datamodule and trainer (nothing runs). ``cli_class``: a :class:`ZooCLI` subclass with more
    arguments (e.g. ``benchmarks/limoe_run.py``); ``runs_root``: see :class:`ZooCLI`."""
    args = list(sys.argv[1:] if args is None else args)
    if not _has_config_flag(args):
        args = ["--config", str(default_config_path())] + args
    _check_config_files(args)
    # We pass sys.argv on as `args` (to prepend the default config); LightningCLI warns about that combination.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run from within Python")
    return cli_class(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=args,
        auto_configure_optimizers=False,  # every zoo task configures its own (RecipeOptimizerMixin)
        save_config_kwargs={"overwrite": True},
        parser_class=ZooArgumentParser,
        parser_kwargs={"description": "Train a model (LightningCLI), then test it. Without --config the default "
                                      f"recipe {default_config_path()} is used."},
        runs_root=runs_root,
    )


def checkpoint_callback(trainer: Trainer) -> Optional[ModelCheckpoint]:
    """The trainer's checkpoint callback (None with ``enable_checkpointing: false``)."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)


def resume_checkpoint(cli: ZooCLI) -> Optional[str]:
    """The ``ckpt_path`` for ``trainer.fit`` from ``--ckpt_path``: ``last`` is this run's ``last.ckpt`` (None,
    with a note on stderr, when there is none yet: a first run with ``--ckpt_path last`` starts from scratch);
    a path must exist.

    Also guards the run folder: a new run (no ``--ckpt_path``) into a folder that holds a run is refused unless
    ``--overwrite`` (which deletes the old checkpoints and metrics); a resumed run drops the ``metrics.csv`` rows
    the interrupted run logged after its checkpoint (the resumed run logs them again)."""
    ckpt_path = cli.config.get("ckpt_path")
    ckpt_cb = checkpoint_callback(cli.trainer)
    if ckpt_path == "last" and ckpt_cb is not None and ckpt_cb.dirpath:
        if not (Path(ckpt_cb.dirpath) / "last.ckpt").is_file():
            print(f"[{Path(sys.argv[0]).name}] --ckpt_path last: no last.ckpt in {ckpt_cb.dirpath}; starting from "
                  "scratch", file=sys.stderr)
            ckpt_path = None
    elif ckpt_path == "last":
        raise ConfigError("--ckpt_path last: this run writes no checkpoints (trainer.enable_checkpointing is "
                          "false), so there is nothing to resume; enable checkpointing or pass a checkpoint path")
    elif ckpt_path and ckpt_path not in ("best", "hpc", "registry") and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    if cli.trainer.fast_dev_run:
        return ckpt_path
    metrics_csv = cli.run_dir / "metrics.csv"
    if cli.config.get("ckpt_path") is None:
        _refuse_or_clear_old_run(cli, ckpt_cb, metrics_csv)
    elif ckpt_path is None:
        truncate_metrics_csv(metrics_csv, 0)  # --ckpt_path last without a checkpoint: the old rows go
    elif ckpt_path not in ("best", "hpc", "registry"):
        path = Path(ckpt_cb.dirpath) / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)  # type: ignore[union-attr]
        step = int(load_training_checkpoint(path).get("global_step", 0))
        truncate_metrics_csv(metrics_csv, step)
    return ckpt_path


def _refuse_or_clear_old_run(cli: ZooCLI, ckpt_cb: Optional[ModelCheckpoint], metrics_csv: Path) -> None:
    old = [metrics_csv] if metrics_csv.is_file() else []
    if ckpt_cb is not None and ckpt_cb.dirpath and Path(ckpt_cb.dirpath).is_dir():
        old += sorted(Path(ckpt_cb.dirpath).glob("*.ckpt"))
    if not old:
        return
    if not cli.config.get("overwrite"):
        raise ConfigError(
            f"{cli.run_dir} already holds a run ({', '.join(p.name for p in old)}). Resume it with --ckpt_path last, "
            f"choose another --run_name, or pass --overwrite true to replace it")
    for path in old:
        path.unlink(missing_ok=True)
    (cli.run_dir / "test_metrics.json").unlink(missing_ok=True)


USER_ERRORS = (ConfigError, FileNotFoundError, CheckpointError)


def _user_error(err: Optional[BaseException]) -> Optional[BaseException]:
    """``err`` or the first of its causes that is a user error. jsonargparse wraps what the ``__init__`` of a
    class chosen by class_path raised (e.g. an unknown model preset) in a ValueError about Union subtypes, with
    the original as ``__cause__``."""
    while err is not None:
        if isinstance(err, USER_ERRORS):
            return err
        err = err.__cause__
    return None


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """User errors (unknown preset / config key, missing data) become ``<prog>: error: ...`` on stderr and exit
    status 2; ``ZOO_DEBUG=1`` keeps the traceback."""
    try:
        yield
    except NonFiniteLossError as err:  # not a user error, but the message says all there is to say
        if os.environ.get("ZOO_DEBUG"):
            raise
        print(f"{prog}: error: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except (*USER_ERRORS, ValueError) as raised:
        err = _user_error(raised)
        if os.environ.get("ZOO_DEBUG"):
            raise
        if err is not None:
            print(f"{prog}: error: {type(err).__name__}: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        # a value the chosen class's __init__ refused (lr=-1, batch_size=0, ...): jsonargparse wraps it in a long
        # message about Union subtypes; print its one meaningful line
        m = _INIT_ERROR.search(str(raised))
        if m is None or not isinstance(raised.__cause__, (ValueError, TypeError)):
            raise
        print(f"{prog}: error: class {m['cls']}: {raised.__cause__}", file=sys.stderr)
        raise SystemExit(2) from None


def main(args: Optional[list[str]] = None) -> dict[str, Any]:
    """Train, test, write plots, and print the summary JSON as the last stdout line.

    User errors (unknown preset / config key, missing data) print ``train.py: error: ...`` and exit with status 2;
    set ``ZOO_DEBUG=1`` for the traceback."""
    quiet_library_notices()
    with user_errors("train.py"):
        return _main(args)


def model_label(model: L.LightningModule) -> str:
    """How plot titles name the model: the zoo task's model preset, else the LightningModule's class."""
    name = getattr(model, "hparams", {}).get("model")
    return name if isinstance(name, str) else type(model).__name__


def _main(args: Optional[list[str]]) -> dict[str, Any]:
    start = time.time()
    cli = build_cli(args)
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    if isinstance(dm, SplitDataModule):  # its state_dict records the position in the epoch (exact resume)
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended")
    ckpt_path = resume_checkpoint(cli)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)

    summary: dict[str, Any] = {
        "run_dir": str(cli.run_dir),
        "global_step": int(trainer.global_step),
        "start_global_step": getattr(model, "start_global_step", None),
        "resumed_from": str(ckpt_path) if ckpt_path else None,
    }
    ckpt_cb = checkpoint_callback(trainer)
    last = ckpt_cb.last_model_path if ckpt_cb is not None else ""
    summary["checkpoint"] = last if last and Path(last).is_file() else None
    if cli.config.get("test") and not trainer.interrupted:
        results = trainer.test(model, datamodule=dm, ckpt_path=summary["checkpoint"], verbose=True)
        test = {k: _plain(v) for k, v in (results[0] if results else {}).items()}
        summary["test"] = test
        summary["test_accuracy"] = test.get("test/acc")  # None for tasks without a classification accuracy
        routing = getattr(model, "test_routing", None)
        if routing is not None:
            summary["routing"] = routing.as_dict()
    summary["wall_time_s"] = round(time.time() - start, 2)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        out = cli.run_dir
        out.mkdir(parents=True, exist_ok=True)
        plots: list[str] = []
        try:
            for lg in trainer.loggers:
                lg.save()
            metrics_csv = out / "metrics.csv"
            if metrics_csv.is_file():
                from zoo.plots import plot_training_curves

                plots.append(str(plot_training_curves(metrics_csv, out / "plots" / "training_curves.png",
                                                      title=f"{model_label(model)}, run {cli.run_name}: training")))
            write_test_plots = getattr(model, "write_test_plots", None)
            if "test" in summary and callable(write_test_plots):
                plots += write_test_plots(out / "plots", title=f"{model_label(model)}, run {cli.run_name} (test)")
        except ValueError as err:  # e.g. no metrics logged: plots are a convenience, never fail the run
            print(f"[train.py] plots skipped: {err}", file=sys.stderr)
        summary["plots"] = plots
        (out / "test_metrics.json").write_text(json.dumps(summary, indent=2))
    if trainer.is_global_zero:
        print(json.dumps(summary), flush=True)
    return summary
