"""Run by tests/tasks/test_causal_lm.py::test_causal_lm_trains_sharded_on_cpu_and_matches_one_process in its own
process: 3 training steps of the tiny MoE decoder LM, in one of two modes.

``sharded OUT``: Lightning's ``ModelParallelStrategy`` (FSDP2, ``CausalLMTask.configure_model`` shards the model) on
``accelerator="cpu", devices=2`` with gloo. Lightning's subprocess launcher re-executes this command line for rank 1,
so the mode and OUT reach both processes. Each rank writes ``OUT/rank<r>.pt``: the samples it trained on per step,
its training loss per step, how each parameter is held (type, placements as (kind, dim), global and local shape,
the local shard), the optimiser's parameter names and whether those are the sharded tensors; rank 0 also writes the
full (gathered) final parameters.

``single OUT``: one process replays the same 3 optimiser steps: for each step, rank 0's samples then rank 1's as two
micro-batches with ``accumulate_grad_batches=2`` (the mean of the two micro-batch gradients is what FSDP's gradient
reduce-scatter computes), so it does not depend on how the aux loss or the capacity scale with the batch. Writes
``OUT/single.pt`` with the losses per micro-batch and the final parameters.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from zoo.tasks.causal_lm import CausalLMTask  # noqa: E402

STEPS, PER_RANK, SEQ, VOCAB = 3, 8, 16, 100
# Small enough to bind at this model's initial gradient norm, so clipping of the sharded (DTensor) gradients by
# their global norm is part of what the two runs must agree on.
CLIP = 0.5


class RandomTokens(Dataset):
    """Fixed random sequences; each item carries its index so the runs can record (and replay) their batches."""

    def __init__(self) -> None:
        self.ids = torch.randint(4, VOCAB, (64, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.bool), "index": i}


class Record(L.Callback):
    """The sample indices and the logged training loss of every batch this process trained on."""

    def __init__(self) -> None:
        self.indices: list[list[int]] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.indices.append(batch["index"].tolist())
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def make(strategy, devices: int, accumulate: int, record: Record) -> tuple[CausalLMTask, L.Trainer]:
    torch.set_num_threads(1)  # two processes share a small CPU; one thread each also keeps the sums' order fixed
    L.seed_everything(0)
    task = CausalLMTask(model="decoder_tiny_moe", vocab_size=VOCAB, warmup_steps=1)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS,
                        accumulate_grad_batches=accumulate, gradient_clip_val=CLIP, callbacks=[record], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return task, trainer


def sharded(out: Path) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    record = Record()
    # All processes are data parallel (Lightning's default mesh puts them on the tensor-parallel dim instead).
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    task, trainer = make(strategy, 2, 1, record)
    trainer.fit(task, DataLoader(RandomTokens(), batch_size=PER_RANK))
    params = {}
    full = {}
    for name, p in task.model.named_parameters():
        is_dtensor = isinstance(p, DTensor)
        params[name] = {"dtensor": is_dtensor, "shape": tuple(p.shape),
                        "placements": [(type(pl).__name__, getattr(pl, "dim", None)) for pl in p.placements]
                        if is_dtensor else None,
                        "local": (p.to_local() if is_dtensor else p).detach().clone()}
        full[name] = (p.full_tensor() if is_dtensor else p).detach().clone()  # a collective: every rank calls it
    opt_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    result = {"steps": trainer.global_step, "indices": record.indices, "losses": record.losses, "params": params,
              "optimizer_names": sorted(n for g in trainer.optimizers[0].param_groups for n in g["names"]),
              "optimizer_holds_model_params": {id(p) for p in opt_params} == {id(p) for p in task.model.parameters()}}
    if trainer.global_rank == 0:
        result["full"] = full
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


def single(out: Path) -> None:
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # Per optimiser step: rank 0's batch, then rank 1's (two micro-batches of one accumulated step).
    batches = [ranks[r]["indices"][step] for step in range(STEPS) for r in range(2)]
    record = Record()
    task, trainer = make("auto", 1, 2, record)
    trainer.fit(task, DataLoader(RandomTokens(), batch_sampler=batches))
    torch.save({"steps": trainer.global_step, "indices": record.indices, "losses": record.losses,
                "optimizer_names": sorted(n for g in trainer.optimizers[0].param_groups for n in g["names"]),
                "full": {n: p.detach().clone() for n, p in task.model.named_parameters()}}, out / "single.pt")


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    {"sharded": sharded, "single": single}[mode](out)
    print(f"{mode} done")
