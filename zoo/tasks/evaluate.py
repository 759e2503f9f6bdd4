"""Evaluate a checkpoint written by ``train.py`` (``eval.py``): metrics JSON + routing plots.

    python eval.py                                         # runs/vmoe_digits/checkpoints/last.ckpt, test split
    python eval.py --checkpoint runs/x/checkpoints/last.ckpt --split val --eval-capacity-factor 2.0 --output m.json
    python eval.py --checkpoint runs/limoe_mnist/checkpoints/last.ckpt   # any zoo task (here contrastive)

The task class, the datamodule (class and arguments) and the precision come from the checkpoint (recorded by
:class:`zoo.tasks.base.ZooTask`; checkpoints from before the task was recorded are image classification);
``--data`` picks another datamodule (a short name from ``zoo.data.IMAGE_CLASSIFICATION_DATAMODULES`` or a class
path), ``--data-dir`` / ``--batch-size`` / ``--data-arg key=value`` change its arguments. The last stdout line is
one JSON object: every test metric under ``metrics`` (names without the ``test/`` prefix), the classification ones
also as ``accuracy`` / ``accuracy_top5`` / ``loss`` / ``ce`` / ``aux_loss`` (None for other tasks), and the
per-layer routing under ``layers``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from zoo.tasks.checkpoints import CheckpointError, load_training_checkpoint
from zoo.tasks.guards import nonfinite_parameters
from zoo.tasks.base import TRAINER_KEY, class_path, task_class_of
from zoo.tasks.datamodule_factory import build_datamodule, datamodule_of_checkpoint, parse_data_args
from zoo.tasks.classification import ImageClassificationTask, write_routing_plots
from zoo.tasks.fewshot import add_fewshot_args, evaluate_fewshot


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from zoo.tasks.cli import DEFAULT_RECIPE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help=f"checkpoint to evaluate (default: runs/{DEFAULT_RECIPE}/checkpoints/last.ckpt under --root)")
    p.add_argument("--root", default=None, help="folder holding runs/ (default: the working directory)")
    p.add_argument("--model", default=None,
                   help="evaluate published weights of this preset instead of a checkpoint (with --pretrained)")
    p.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="TAG",
                   help="with --model: the weights tag (default: the preset's default), hf-hub:ORG/REPO or "
                        "local-dir:PATH; the recorded datamodule, batch size and threads are used, and the result "
                        "is compared with the recorded accuracy")
    p.add_argument("--data", default=None, help="datamodule short name or class path (default: the checkpoint's)")
    p.add_argument("--data-dir", default=None, help="data root for file-backed datamodules (MNIST, CIFAR, ...)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's (changes MoE groups)")
    p.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other datamodule argument (YAML value), repeatable")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--eval-capacity-factor", type=float, default=None)
    p.add_argument("--eval-top-k", type=int, default=None)
    p.add_argument("--eval-dropless", action="store_true", help="no capacity limit at eval")
    p.add_argument("--output", default=None, help="write the metrics JSON here too")
    p.add_argument("--plots-dir", default=None,
                   help="PNG folder (default: <checkpoint folder>/<checkpoint stem>_<split>_plots; with --pretrained "
                        "<root>/runs/pretrained/<model>_<tag>_<split>_plots)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", default=None, help="default: the precision the checkpoint was trained with")
    p.add_argument("--num-threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress-bar", action="store_true")
    add_fewshot_args(p)  # --fewshot: few-shot linear evaluation (zoo/tasks/fewshot.py)
    return p.parse_args(argv)


def evaluate_split(trainer, task, dm, split: str) -> dict[str, Any]:  # noqa: ANN001 (Lightning objects)
    """``trainer.test`` of ``task`` on the ``split`` ("test" or "val") of ``dm``; the logged metrics."""
    if split == "val":
        # The test hooks run on the val loader, still through the datamodule: tasks read it while evaluating
        # (the contrastive task's zero-shot class names, templates and tokenizer).
        dm.setup("validate")
        dm.test_dataloader = dm.val_dataloader
    results = trainer.test(task, datamodule=dm, verbose=False)
    return results[0] if results else {}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L

    from zoo.tasks.cli import default_checkpoint

    if args.fewshot:  # few-shot linear evaluation of the same checkpoint / published model (zoo/tasks/fewshot.py)
        return evaluate_fewshot(args)
    if args.model is not None or args.pretrained is not None:
        return _evaluate_pretrained(args)
    ckpt_path = Path(args.checkpoint) if args.checkpoint else default_checkpoint(args.root)
    if not ckpt_path.is_file():
        hint = ("run `python train.py` first (it trains the default recipe and writes that checkpoint), "
                "or pass --checkpoint PATH") if not args.checkpoint else "check the path"
        raise FileNotFoundError(f"no checkpoint at {ckpt_path}: {hint}")
    checkpoint = load_training_checkpoint(ckpt_path)
    trained = checkpoint.get(TRAINER_KEY) or {}
    # Same CPU thread count as the run by default (when it used fewer): faster on a shared CPU and the same
    # reduction order, so the test accuracy is reproduced exactly.
    threads = args.num_threads or (trained.get("num_threads") if trained.get("num_threads", 1 << 30)
                                   < torch.get_num_threads() else None)
    if threads:
        torch.set_num_threads(int(threads))
    task = task_class_of(checkpoint).load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=False)
    bad = nonfinite_parameters(task)
    if bad:
        raise CheckpointError(f"checkpoint {ckpt_path} holds non-finite (NaN / inf) weights, e.g. {', '.join(bad)}: "
                              "the training that wrote it diverged; evaluate an earlier checkpoint or retrain "
                              "(lower --model.lr)")
    task.set_eval_overrides(capacity_factor=args.eval_capacity_factor, top_k=args.eval_top_k,
                            dropless=True if args.eval_dropless else None)
    overrides = parse_data_args(args.data_arg)
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    dm = datamodule_of_checkpoint(checkpoint, args.data, overrides)
    precision = args.precision or trained.get("precision") or "32-true"
    trainer = L.Trainer(accelerator=args.accelerator, devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=not args.no_progress_bar)
    metrics = evaluate_split(trainer, task, dm, args.split)
    routing = getattr(task, "test_routing", None)
    out: dict[str, Any] = {
        "checkpoint": str(ckpt_path.resolve()),
        "split": args.split,
        "task": class_path(task),
        "datamodule": class_path(dm),
        "model": task.hparams.get("model"),
        "n_examples": getattr(routing, "num_examples", None),
        "accuracy": metrics.get("test/acc"),
        "accuracy_top5": metrics.get("test/acc_top5"),
        "loss": metrics.get("test/loss"),
        "ce": metrics.get("test/ce"),
        "aux_loss": metrics.get("test/aux_loss"),
        "metrics": {k.removeprefix("test/"): float(v) for k, v in metrics.items()},
        "eval_capacity_factor": task.hparams.get("eval_capacity_factor"),
        "eval_top_k": task.hparams.get("eval_top_k"),
        "eval_dropless": task.hparams.get("eval_dropless"),
        "global_step": checkpoint.get("global_step"),
        "layers": routing.as_dict() if routing else {},
    }
    if not args.no_plots:
        plots_dir = Path(args.plots_dir) if args.plots_dir else ckpt_path.parent / f"{ckpt_path.stem}_{args.split}_plots"
        out["plots"] = task.write_test_plots(plots_dir, title=f"{task.hparams.get('model')} on {type(dm).__name__} "
                                                              f"({args.split})",
                                             class_names=list(getattr(dm, "class_names", None) or []) or None)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2))
    return out


def pretrained_plots_dir(args: argparse.Namespace, tag: Any) -> Path:
    """Default plot folder of ``--model NAME --pretrained``: ``<root>/runs/pretrained/<NAME>_<tag>_<split>_plots``
    (root = ``--root``, else the working directory), like a checkpoint's ``<stem>_<split>_plots``."""
    import re

    safe_tag = re.sub(r"[^\w.-]+", "_", str(tag)).strip("_") or "default"
    return Path(args.root or Path.cwd()) / "runs" / "pretrained" / f"{args.model}_{safe_tag}_{args.split}_plots"


def _evaluate_pretrained(args: argparse.Namespace) -> dict[str, Any]:
    """``--model NAME --pretrained [TAG]``: published weights on the data they were recorded on."""
    import lightning as L

    if args.model is None or args.pretrained is None:
        raise ValueError("--model and --pretrained go together: e.g. eval.py --model vmoe_small_mnist --pretrained")
    if args.checkpoint:
        raise ValueError("give either --checkpoint or --model/--pretrained, not both")
    task = ImageClassificationTask(model=args.model, pretrained=args.pretrained)
    task.set_eval_overrides(capacity_factor=args.eval_capacity_factor, top_k=args.eval_top_k,
                            dropless=True if args.eval_dropless else None)
    info = getattr(task.model, "pretrained_cfg", None) or {}
    overrides = parse_data_args(args.data_arg)
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    recorded = info.get("data")
    if not (args.data or recorded):
        raise ValueError(f"the weights of {args.model} do not record their datamodule; pass --data")
    recorded = recorded or {}
    dm = build_datamodule(recorded.get("class_path"), recorded.get("init_args"), data=args.data, overrides=overrides)
    threads = args.num_threads or (recorded or {}).get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))
    trainer = L.Trainer(accelerator=args.accelerator, devices=1, precision=args.precision or "32-true", logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=not args.no_progress_bar)
    metrics = evaluate_split(trainer, task, dm, args.split)
    routing = task.test_routing
    want = (info.get("metrics") or {}).get("accuracy") if args.split == (info.get("metrics") or {}).get("split", "test") else None
    acc = metrics.get("test/acc")
    out: dict[str, Any] = {
        "model": args.model,
        "pretrained": info.get("tag", args.pretrained),
        "source": info.get("source"),
        "split": args.split,
        "datamodule": f"{type(dm).__module__}.{type(dm).__qualname__}",
        "n_examples": routing.num_examples if routing else None,
        "accuracy": acc,
        "accuracy_top5": metrics.get("test/acc_top5"),
        "loss": metrics.get("test/loss"),
        "recorded_accuracy": want,
        "reproduced": None if want is None or acc is None else abs(acc - want) < 1e-6,
        "layers": routing.as_dict() if routing else {},
    }
    if not args.no_plots:
        names = list(getattr(dm, "class_names", []) or [])
        out["plots"] = write_routing_plots(task, names, Path(args.plots_dir or pretrained_plots_dir(args, out["pretrained"])),
                                           title=f"{args.model} ({out['pretrained']}) on {type(dm).__name__} "
                                                 f"({args.split})")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2))
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from zoo.tasks.quiet import quiet_library_notices

    quiet_library_notices()
    args = parse_args(argv)
    try:
        out = evaluate(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"eval.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.stdout.flush()
    print(json.dumps(out), flush=True)
    return out
