"""Lightning: DDP with expert parallelism for the MoE layers of any zoo model.

    Trainer(devices=N, strategy=ExpertParallelStrategy())           # or strategy="expert_parallel"
    python train.py --trainer.devices=N --trainer.strategy=expert_parallel

When fitting, after the model is on its device (and before DDP wraps it and the optimizers are built), the
experts of every :class:`~zoo.moe.MoELayer` are sharded over the ranks (see
:mod:`zoo.distributed.expert_parallel`) and DDP is told to ignore them; everything else is Lightning's
DDP. Checkpoints hold the full (gathered) expert tensors and optimizer state under the normal names, so a
run saved on N processes resumes on M (1 included, with or without this strategy). At the end of ``fit``
the experts are gathered back, so the LightningModule is a normal, complete model again on every rank;
``validate``/``test``/``predict`` on their own run the complete model on each rank (plain DDP inference).
"""

from __future__ import annotations

import types
from typing import Any, Mapping, Optional

from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from zoo.distributed.comm import ExpertParallelGroup
from zoo.distributed.expert_parallel import (clip_grad_norm_, full_optimizer_state_dict, full_state_dict,
                                             ignore_experts_in_ddp, is_sharded, shard_experts,
                                             shard_optimizer_state_dict, sync_expert_grads, unshard_experts)


class ExpertParallelStrategy(DDPStrategy):
    """:class:`~lightning.pytorch.strategies.DDPStrategy` whose MoE experts are sharded over the ranks.

    Args:
        expert_parallel_size: ranks per expert-parallel group; must divide the number of processes and every
            MoE layer's number of experts. None = all processes (each rank holds E / world_size experts).
            With a smaller size, the world holds several copies of each expert shard whose gradients are
            summed after every backward.
        All other arguments are :class:`DDPStrategy`'s (``start_method="spawn"`` = ``ddp_spawn``,
        ``process_group_backend="gloo"`` on CPU is the default there, "nccl" on GPU).

    Gradient clipping by norm (``Trainer(gradient_clip_val=...)``) uses the norm of the whole model (the
    experts' part summed over the ranks), i.e. the same factor as single-process training.
    """

    strategy_name = "expert_parallel"

    def __init__(self, *args: Any, expert_parallel_size: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expert_parallel_size = expert_parallel_size
        self._ep: Optional[ExpertParallelGroup] = None
        self._ddp_ignore_before: Optional[list[str]] = None

    # ------------------------------------------------------------------------------------- setup
    def setup(self, trainer) -> None:
        module = self.lightning_module
        if trainer.state.fn != TrainerFn.FITTING and module is not None and is_sharded(module):
            unshard_experts(module)  # left sharded by an interrupted fit: evaluate the complete model
        super().setup(trainer)

    def configure_ddp(self) -> None:
        module = self.model  # the LightningModule, on its device, not yet wrapped
        self._ep = shard_experts(module, self.expert_parallel_size)
        self._ddp_ignore_before = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
        ignore_experts_in_ddp(module)
        self._use_global_norm_clipping()
        if getattr(self.precision_plugin, "scaler", None) is not None:
            rank_zero_warn("ExpertParallelStrategy with a gradient scaler (precision '16-mixed'): each rank checks "
                           "its own expert gradients for inf/NaN, so ranks may disagree on skipping a step. "
                           "Prefer 'bf16-mixed' (no scaler).")
        super().configure_ddp()

    def _use_global_norm_clipping(self) -> None:
        plugin = self.precision_plugin
        if getattr(plugin, "_zoo_expert_parallel_clipping", False):
            return
        strategy = self

        def clip_grad_by_norm(plugin_self, optimizer, clip_val) -> None:
            clip_grad_norm_(plugin_self.main_params(optimizer), clip_val, strategy.lightning_module)

        plugin.clip_grad_by_norm = types.MethodType(clip_grad_by_norm, plugin)
        plugin._zoo_expert_parallel_clipping = True

    # ---------------------------------------------------------------------------------- backward
    def post_backward(self, closure_loss) -> None:
        super().post_backward(closure_loss)
        if self._ep is not None and self._ep.num_replicas > 1:
            sync_expert_grads(self.lightning_module)

    # ------------------------------------------------------------------------------- checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Full state dict: expert tensors gathered from all ranks under their normal names (collective;
        Lightning calls it on every rank when saving)."""
        module = self.lightning_module
        return full_state_dict(module) if is_sharded(module) else module.state_dict()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        state = super().optimizer_state(optimizer)
        module = self.lightning_module
        if is_sharded(module) and state:
            opt = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
            state = full_optimizer_state_dict(opt, module, state)
        return state

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        module = self.lightning_module
        if is_sharded(module):
            states = [shard_optimizer_state_dict(opt, module, s)
                      for opt, s in zip(self.optimizers, checkpoint["optimizer_states"])]
            checkpoint = {**checkpoint, "optimizer_states": states}
        super().load_optimizer_state_dict(checkpoint)

    # (load_model_state_dict needs nothing: ShardedExperts keeps its slice of a full tensor when loading.)

    # ---------------------------------------------------------------------------------- teardown
    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None and is_sharded(module):
            trainer = getattr(module, "_trainer", None)
            if trainer is None or trainer.state.status == TrainerStatus.RUNNING:
                unshard_experts(module)  # collective; every rank finished the stage normally
                if self._ddp_ignore_before is not None:
                    module._ddp_params_and_buffers_to_ignore = self._ddp_ignore_before
                self._ep = None
            else:
                rank_zero_warn("ExpertParallelStrategy: the run was interrupted; the model's experts stay sharded "
                               "(each rank holds its own). Load the last checkpoint for a complete model.")
        super().teardown()


def _register() -> None:
    for name, start_method in (("expert_parallel", "popen"), ("expert_parallel_spawn", "spawn"),
                               ("expert_parallel_fork", "fork")):
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, ExpertParallelStrategy, start_method=start_method,
                                      description=f"DDP with expert-parallel MoE layers, start_method {start_method!r}")


_register()
