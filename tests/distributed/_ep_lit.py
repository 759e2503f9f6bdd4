"""Lightning pieces of the distributed tests (importable by name in ddp_spawn workers)."""

from __future__ import annotations

import json
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from zoo.tasks.classification import ImageClassificationTask

STEPS_PER_EPOCH, GLOBAL_BATCH = 3, 8


def make_task() -> ImageClassificationTask:
    """The classification task on vmoe_tiny_test, router noise off (routing is then a function of the weights
    and images), constant LR, identical initial weights every time."""
    torch.manual_seed(0)
    return ImageClassificationTask(model="vmoe_tiny_test", model_overrides={"encoder.moe.noise_std": 0.0},
                                   optimizer="adamw", lr=3e-3, warmup_steps=0, lr_decay="constant")


def eval_images() -> torch.Tensor:
    return torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(7))


class RankSlices(L.LightningDataModule):
    """Fixed data; at step s rank r of W gets images ``[r*B, (r+1)*B)`` of global batch s (B = 8 / W), so the
    union over ranks, in rank order, is one process's batch (and the routing groups of 2 images coincide)."""

    def train_dataloader(self) -> DataLoader:
        W, r = self.trainer.world_size, self.trainer.global_rank
        B = GLOBAL_BATCH // W
        g = torch.Generator().manual_seed(123)
        x = torch.randn(STEPS_PER_EPOCH, GLOBAL_BATCH, 3, 16, 16, generator=g)
        y = torch.randint(0, 10, (STEPS_PER_EPOCH, GLOBAL_BATCH), generator=g)
        x, y = x[:, r * B:(r + 1) * B].reshape(-1, 3, 16, 16), y[:, r * B:(r + 1) * B].reshape(-1)
        return DataLoader(TensorDataset(x, y), batch_size=B, shuffle=False)


class Recorder(L.Callback):
    """Writes ``<out>/<tag>_rank<r>.json``: this rank's training losses, and the logits of its share of
    :func:`eval_images` computed (in eval mode) when fitting starts, i.e. after the strategy sharded the
    experts and any checkpoint was loaded."""

    def __init__(self, out_dir: str, tag: str) -> None:
        self.out_dir, self.tag = out_dir, tag
        self.losses: list[float] = []
        self.logits: list = []

    def setup(self, trainer, pl_module, stage) -> None:
        if trainer.world_size > 1:  # forked workers: one intra-op thread (GNU OpenMP is not fork-safe)
            torch.set_num_threads(1)

    def on_fit_start(self, trainer, pl_module) -> None:
        W, r = trainer.world_size, trainer.global_rank
        images = eval_images()
        per = images.shape[0] // W
        pl_module.eval()
        with torch.no_grad():
            self.logits = pl_module(images[r * per:(r + 1) * per]).logits.tolist()
        pl_module.train()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        sharded = [n for n, m in pl_module.named_modules() if type(m).__name__ == "ShardedExperts"]
        with open(os.path.join(self.out_dir, f"{self.tag}_rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"losses": self.losses, "logits": self.logits, "sharded_layers": len(sharded)}, f)
