"""Run by tests/tasks/test_causal_lm.py::test_causal_lm_trains_under_fsdp in its own process (Lightning's FSDP
launcher re-executes the command per GPU): 3 steps of the tiny MoE decoder LM under ``strategy="fsdp"`` on 2 GPUs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from zoo.tasks.causal_lm import CausalLMTask  # noqa: E402


class RandomTokens(Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(4, 100, (64, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(16, dtype=torch.bool)}


if __name__ == "__main__":
    L.seed_everything(0)
    task = CausalLMTask(model="decoder_tiny_moe", vocab_size=100, warmup_steps=1)
    trainer = L.Trainer(accelerator="cuda", devices=2, strategy="fsdp", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, DataLoader(RandomTokens(), batch_size=8))
    loss = trainer.callback_metrics.get("train/loss")
    if trainer.global_rank == 0:
        print(f"FSDP OK steps={trainer.global_step} loss={float(loss):.4f}")
