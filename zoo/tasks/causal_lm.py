"""Causal language modelling with a zoo decoder (dense or MoE) as a LightningModule.

    batch {"input_ids" [B, L], "attention_mask" [B, L]} -> DecoderLM -> logits [B, L, V]
    loss = mean next-token cross entropy over real target tokens + the MoE layers' aux_loss

Logged: ``{train,val,test}/loss``, ``/ce``, ``/aux_loss``, ``/aux/<name>``, ``val|test/perplexity``
(torchmetrics, exp of the token-mean cross entropy over the split) and per MoE layer
``<split>/moe/<layer>/{max_share,min_share,dropped}``. ``test`` also fills :attr:`CausalLMTask.test_routing`
(tokens per expert per layer, from a :class:`~zoo.tasks.routing_report.RoutingReport`) for the summary and the
expert-utilisation plot.

Under Lightning's ``ModelParallelStrategy`` (FSDP2, also on CPU with gloo) :meth:`CausalLMTask.configure_model`
shards the decoder (:func:`fully_shard_decoder`); under every other strategy it does nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.text import Perplexity

from zoo.models.output import ModelOutput
from zoo.factory import create_model
from zoo.tasks.base import ZooTask, fill_from_datamodule, moe_layer_names
from zoo.tasks.optim import OptimizerConfig
from zoo.tasks.routing_report import RoutingReport, RoutingSummary

IGNORE = -100
DATA_DIMS = ("vocab_size",)


def next_token_targets(input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """Targets ``[B, L-1]`` for logits at positions ``0..L-2``: the next token, ``IGNORE`` where it is padding."""
    targets = input_ids[:, 1:].clone()
    if attention_mask is not None:
        targets[~attention_mask[:, 1:].to(torch.bool)] = IGNORE
    return targets


def fully_shard_decoder(model: nn.Module, mesh: Any) -> nn.Module:
    """FSDP2 over ``mesh`` (Lightning's ``("data_parallel", "tensor_parallel")`` device mesh): each block of
    ``model.blocks`` is its own unit (its parameters are gathered just for its forward / backward, so at most one
    block is unsharded at a time), then the root takes what is left (embedding, final norm, LM head; a tied LM head
    is the embedding's tensor, owned once by the root unit). Parameters become DTensors sharded on dim 0 (the stacked
    experts ``[E, ...]`` on the expert dim), so the optimiser must be built after this: Lightning calls
    ``configure_optimizers`` after ``configure_model``.

    Idempotent (Lightning calls ``configure_model`` for every fit / validate / test). Only data parallelism: the zoo
    has no tensor-parallel plan, so a mesh with a tensor-parallel dim > 1 is refused rather than silently
    replicating work on it."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(f"the zoo's decoder LMs shard with FSDP2 only (no tensor parallelism), but the device mesh "
                         f"has tensor_parallel={mesh['tensor_parallel'].size()}; use "
                         "ModelParallelStrategy(data_parallel_size=<number of processes>, tensor_parallel_size=1)")
    dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model


class CausalLMTask(ZooTask):
    """Train / evaluate a decoder LM preset on next-token prediction.

    Args:
        model: a ``decoder`` preset (e.g. ``"decoder_tiny_moe"``); model_overrides: changes to its config.
        vocab_size: None = the datamodule's (``take_from_datamodule``).
        gradient_checkpointing: recompute block activations in the backward pass (less memory, ~1/3 more compute);
            ``"except_moe"``: all but the MoE layers (``DecoderLM.gradient_checkpointing``).
        compile: run the decoder blocks through ``torch.compile`` while training (``DecoderLM.compile_blocks``);
            ``"cuda_graphs"``: also replayed as CUDA graphs (fixed-length batches).
        pretrained: as :func:`zoo.create_model`.
        **shared: the optimiser, LR schedule and eval-time routing every task takes (:class:`ZooTask`,
            :class:`zoo.tasks.optim.OptimizerConfig`); defaults: ``optimizer_defaults`` (betas (0.9, 0.95), weight
            decay 0.1, final LR 0.1 x peak).
    """

    optimizer_defaults = OptimizerConfig(betas=(0.9, 0.95), weight_decay=0.1, min_lr_ratio=0.1)

    def __init__(
        self,
        model: str = "decoder_tiny_moe",
        model_overrides: Optional[dict[str, Any]] = None,
        vocab_size: Optional[int] = None,
        gradient_checkpointing: Union[bool, Literal["except_moe"]] = False,
        compile: Union[bool, Literal["cuda_graphs"]] = False,
        pretrained: Optional[Union[bool, str]] = None,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        self.model = self._build_model()
        self.val_ppl, self.test_ppl = Perplexity(ignore_index=IGNORE), Perplexity(ignore_index=IGNORE)
        self.test_routing: Optional[RoutingSummary] = None
        self._routing_report: Optional[RoutingReport] = None

    def _build_model(self) -> nn.Module:
        hp = self.hparams
        overrides = dict(hp.model_overrides or {})
        if hp.get("vocab_size") is not None:
            overrides["vocab_size"] = hp.vocab_size
        model = create_model(hp.model, pretrained=hp.get("pretrained"), **overrides)
        if not hasattr(model, "gradient_checkpointing"):
            raise ValueError(f"CausalLMTask needs a decoder LM preset; {hp.model!r} builds a {type(model).__name__}")
        model.gradient_checkpointing = hp.gradient_checkpointing
        model.compile_blocks = hp.get("compile", False)
        self.apply_eval_routing(model)
        self.layer_names = moe_layer_names(model)
        return model

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (FSDP2): shard every decoder block, then the rest (embedding,
        final norm, LM head) with :func:`torch.distributed.fsdp.fully_shard` over the data-parallel mesh. A no-op
        under every other strategy (no device mesh). See :func:`fully_shard_decoder`."""
        mesh = self.device_mesh
        if mesh is not None:
            fully_shard_decoder(self.model, mesh)

    def take_from_datamodule(self, dm: Any) -> None:
        """The vocabulary size comes from the datamodule unless given (a disagreeing value is an error)."""
        if fill_from_datamodule(self.hparams, DATA_DIMS, dm, self.model.config, "model"):
            self.model = self._build_model()

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> ModelOutput:
        return self.model(input_ids, attention_mask)

    def _shared_step(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, ModelOutput, Tensor]:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        out = self(ids, mask)
        logits = out.logits[:, :-1].float()
        targets = next_token_targets(ids, mask)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
        aux = out.aux_loss.to(ce.dtype)
        loss = ce + aux
        # Epoch means weigh batches by their target tokens; training logs per step, where the weight is unused, so
        # it takes no count (a Python int from a device tensor would wait for the GPU every step).
        n_tokens = ids.shape[0] if split == "train" else int((targets != IGNORE).sum())
        self.log_losses_and_routing(split, loss, ce, aux, out, batch_size=n_tokens)
        if split != "train":
            metric = self.val_ppl if split == "val" else self.test_ppl
            metric(logits.detach(), targets)
            self.log(f"{split}/perplexity", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss, out, targets

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _, _ = self._shared_step(batch, "train")
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def on_test_epoch_start(self) -> None:
        self._routing_report = RoutingReport(self.model).start()
        self.test_routing = None

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")
        if self._routing_report is not None:
            self._routing_report.count_examples(batch["input_ids"].shape[0])

    def on_test_epoch_end(self) -> None:
        report, self._routing_report = self._routing_report, None
        if report is None:
            return
        report.stop()
        self.test_routing = report.summary(self.cross_process_sum())

    def write_test_plots(self, out_dir: Union[str, Path], title: str = "",
                         class_names: Optional[list[str]] = None) -> list[str]:
        """Expert utilisation (tokens per expert per MoE layer) of the last test pass."""
        from zoo.plots import plot_expert_utilisation

        routing = self.test_routing
        if routing is None or not routing.layer_names:
            return []
        path = plot_expert_utilisation(routing.tokens_per_expert, routing.layer_names,
                                       Path(out_dir) / "expert_utilisation.png",
                                       title=f"{title}: expert utilisation" if title else None)
        return [str(path)]
