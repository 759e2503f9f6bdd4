"""Train + test one LIMoE recipe (``configs/train/limoe_*.yaml``) and write a results JSON.

The recipes are ``train.py`` recipes (``model: {class_path: zoo.tasks.contrastive.ContrastiveTask, ...}``,
``data: {class_path: zoo.data.image_text...}``); this runner parses them with the same CLI
(:class:`zoo.tasks.cli.ZooCLI`, so every ``train.py`` option works here too, ``--ckpt_path last`` included) and
adds ``--out``, the benchmark JSON:

    python benchmarks/limoe_run.py --config configs/train/limoe_mnist.yaml \\
        --out benchmarks/results/limoe_mnist_entropy_on.json [--model.init_args.model_overrides=...]

Writes ``runs/<run_name>/`` under the repository (CSV metrics, config.yaml, checkpoints, plots) and, with
``--out``, a JSON with the command, machine, versions, date, wall time, test metrics and the per-layer
routing-by-modality summary. Needs ``../shared/data`` (or ``ZOO_DATA``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.cli import LightningArgumentParser

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from zoo.config import ConfigError  # noqa: E402 (after the path fix)
from zoo.tasks.cli import ZooCLI, build_cli, resume_checkpoint, user_errors  # noqa: E402


class RecipeCLI(ZooCLI):
    """``train.py``'s CLI plus ``--out``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--out", type=Optional[str], default=None, help="results JSON to write")


def versions() -> dict[str, str]:
    import lightning
    import open_clip
    import torchmetrics

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "open_clip": open_clip.__version__, "torchmetrics": torchmetrics.__version__}


def machine() -> str:
    gpu = f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
            f"torch threads {torch.get_num_threads()}, {gpu}")


def _repo_relative(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(args: Optional[list[str]] = None) -> dict[str, Any]:
    args = list(sys.argv[1:] if args is None else args)
    with user_errors("limoe_run.py"):
        return _main(args)


def _main(args: list[str]) -> dict[str, Any]:
    if not any(a in ("--config", "-c") or a.startswith("--config=") for a in args):
        # train.py falls back to its default (image-classification) recipe; a LIMoE benchmark has none
        raise ConfigError("limoe_run.py needs --config configs/train/limoe_<name>.yaml")
    start = time.time()
    # runs/ under the repository whatever the working directory, as the results JSONs name them relative to it
    cli = build_cli(args, cli_class=RecipeCLI, runs_root=REPO)
    trainer, task, dm = cli.trainer, cli.model, cli.datamodule
    trainer.fit(task, datamodule=dm, ckpt_path=resume_checkpoint(cli))
    fit_s = time.time() - start
    summary: dict[str, Any] = {
        "command": "python benchmarks/limoe_run.py " + " ".join(args),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "run_dir": _repo_relative(cli.run_dir),
        "seed": cli.config.get("seed_everything"),
        "global_step": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "train_wall_time_s": round(fit_s, 1),
        "model_preset": task.hparams.model,
        "model_overrides": task.hparams.model_overrides,
        "model_config": _plain_config(task.model.config),
        "num_params": sum(p.numel() for p in task.model.parameters()),
        # Accuracies and recalls in "val" / "test" are fractions in [0, 1] (runs recorded before 2026-12-03 have no
        # metric_unit and are in percent: benchmarks/limoe_report.py tells them apart).
        "metric_unit": "fraction",
        "val": task.last_metrics.get("val"),
    }
    if cli.config.get("test"):
        trainer.test(task, datamodule=dm, verbose=False)
        summary["test"] = task.last_metrics.get("test")
        if task.test_routing is not None:
            summary["test_routing"] = task.test_routing.as_dict()
            summary["test_routing_means"] = task.test_routing.means()
            task.write_test_plots(cli.run_dir / "plots")
    summary["wall_time_s"] = round(time.time() - start, 1)
    summary["plots"] = sorted(_repo_relative(p) for p in (cli.run_dir / "plots").glob("*.png")) \
        if (cli.run_dir / "plots").is_dir() else []
    out = cli.config.get("out")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary.get(k) for k in ("run_dir", "test", "test_routing_means", "wall_time_s")}),
          flush=True)
    return summary


def _plain_config(config: Any) -> Any:
    from zoo.config import to_dict

    return to_dict(config)


if __name__ == "__main__":
    main()
