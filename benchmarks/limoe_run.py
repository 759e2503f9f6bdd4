"""Train + test one LIMoE recipe (``configs/train/limoe_*.yaml``) and write a results JSON.

The recipes are LightningCLI configs (``model: {class_path: zoo.tasks.contrastive.ContrastiveTask, ...}``,
``data: {class_path: zoo.data.image_text...}``) plus the zoo CLI's top-level ``run_name`` / ``num_threads`` /
``test`` keys, so they also run with ``python train.py --config ...`` once ``train.py`` accepts any
LightningModule / LightningDataModule (subclass mode). This runner parses them with LightningCLI itself:

    python benchmarks/limoe_run.py --config configs/train/limoe_mnist.yaml \\
        --out benchmarks/results/limoe_mnist_entropy_on.json [--model.init_args.model_overrides=...]

Writes ``runs/<run_name>/`` (CSV metrics, plots) and, with ``--out``, a JSON with the command, machine, versions,
date, wall time, test metrics and the per-layer routing-by-modality summary. Needs ``../shared/data`` (or
``ZOO_DATA``).
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

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class RecipeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=Optional[str], default=None)
        parser.add_argument("--num_threads", type=Optional[int], default=None)
        parser.add_argument("--test", type=bool, default=True)
        parser.add_argument("--out", type=Optional[str], default=None, help="results JSON to write")

    def before_instantiate_classes(self) -> None:
        if self.config.get("num_threads"):
            torch.set_num_threads(int(self.config.num_threads))
        configs = self.config.get("config") or []
        self.run_name = self.config.get("run_name") or (Path(str(configs[-1])).stem if configs else "run")
        self.run_dir = REPO / "runs" / self.run_name

    def instantiate_trainer(self, **kwargs: Any):
        if self.config_init.trainer.get("logger") in (None, True):
            kwargs["logger"] = CSVLogger(str(self.run_dir.parent), name=self.run_name, version="")
        if self.config_init.trainer.get("default_root_dir") is None:
            kwargs["default_root_dir"] = str(self.run_dir)
        return super().instantiate_trainer(**kwargs)


def versions() -> dict[str, str]:
    import lightning
    import open_clip
    import torchmetrics

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "open_clip": open_clip.__version__, "torchmetrics": torchmetrics.__version__}


def machine() -> str:
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores (shared with other jobs), "
            f"torch threads {torch.get_num_threads()}, no GPU")


def main(args: Optional[list[str]] = None) -> dict[str, Any]:
    args = list(sys.argv[1:] if args is None else args)
    start = time.time()
    cli = RecipeCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    run=False, args=args, auto_configure_optimizers=False, save_config_callback=None)
    trainer, task, dm = cli.trainer, cli.model, cli.datamodule
    trainer.fit(task, datamodule=dm)
    fit_s = time.time() - start
    summary: dict[str, Any] = {
        "command": "python benchmarks/limoe_run.py " + " ".join(args),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "run_dir": str(cli.run_dir.relative_to(REPO)),
        "seed": cli.config.get("seed_everything"),
        "global_step": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "train_wall_time_s": round(fit_s, 1),
        "model_preset": task.hparams.model,
        "model_overrides": task.hparams.model_overrides,
        "model_config": _plain_config(task.model.config),
        "num_params": sum(p.numel() for p in task.model.parameters()),
        "val": task.last_metrics.get("val"),
    }
    if cli.config.get("test"):
        trainer.test(task, datamodule=dm, verbose=False)
        summary["test"] = task.last_metrics.get("test")
        if task.test_routing is not None:
            summary["test_routing"] = task.test_routing.as_dict()
            summary["test_routing_means"] = task.test_routing.means()
    summary["wall_time_s"] = round(time.time() - start, 1)
    summary["plots"] = sorted(str(p.relative_to(REPO)) for p in (cli.run_dir / "plots").glob("*.png")) \
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
