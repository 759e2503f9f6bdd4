"""The one MoE layer every model family uses: group tokens, route, run the experts, combine.

    x [B, S, D] --group--> [G, S_g, D] --router.plan--> RoutingPlan --routed_moe--> y [B, S, D]
                                                                     (+ shared experts)

:func:`routed_moe` is the layer's sparse forward in one function: the router's decision, the experts (on the fused
GPU path) and the losses and statistics; the layer compiles it as ONE graph in training on CUDA (one CUDA graph
replay per layer, :mod:`zoo.moe.compiled`). Routers only decide (:mod:`zoo.moe.routing`); experts are any
:class:`~zoo.moe.experts.Experts` (the fused kernel serves those with stacked weights, a reference dispatcher the
rest, :mod:`zoo.moe.dispatch`); losses and statistics are :mod:`zoo.moe.stats`.

A dropped or masked token's output is 0 (the residual connection carries it). After each forward the
layer holds ``self.aux`` (:class:`MoEAux`): the weighted auxiliary loss, each loss's value and the routing
statistics, which models collect with :func:`collect_moe_aux`; with ``record_routing = True`` also
``self.last_routing`` (:class:`RoutingRecord`). Keeping them on the layer (rather than in the return value) lets
an MoE layer replace any ``mlp(x)`` call, e.g. inside a timm ``Block``.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from zoo.layers.mlp import Mlp
from zoo.moe.compiled import maybe_compiled
from zoo.moe.config import MoEConfig
from zoo.moe.dispatch import DISPATCHERS, dense_dispatch
from zoo.moe.experts import Experts, StackedExperts
from zoo.moe.routing import ExpertChoiceRouter, Routing, SoftRouter, TopKRouter
from zoo.moe.stats import MoEAux, RoutingRecord, RoutingStats, soft_aux, soft_expert_probs, sparse_aux


def _fused_moe_or_none(x: Tensor, activation: str):
    """``zoo.kernels.fused_moe`` where it runs on ``x`` (CUDA, or CPU under TRITON_INTERPRET=1) and supports
    ``activation``, else None."""
    if activation not in ("gelu_tanh", "swiglu"):
        return None
    try:
        from zoo.kernels import fused_moe, fused_moe_available
    except ImportError:
        return None
    return fused_moe if fused_moe_available(x) else None


# How many routing_statistics_off() blocks are open. A module global, not a ContextVar: the layer reads it inside
# compiled code, and torch 2.11's dynamo cannot trace ContextVar.get (a graph break in every MoE layer, after which a
# compiled 32-block decode step recompiled per block and ran 24 of them eagerly: session 14 on the H200). Dynamo
# guards on a global's value, so entering or leaving the block selects the other compiled graph.
_STATISTICS_OFF_DEPTH = 0


def _statistics_off() -> bool:
    return _STATISTICS_OFF_DEPTH > 0


@contextlib.contextmanager
def routing_statistics_off() -> Iterator[None]:
    """MoE layers in eval mode skip their auxiliary losses and routing statistics inside this block (``layer.aux``
    stays None; outputs are unchanged, bit for bit).

    For generation: every decode step runs each MoE layer on one token per sequence, where the losses and
    statistics are a large share of the layer's kernel launches and nobody reads them. A layer in training mode
    refuses to run inside it (its aux loss is part of the objective). Routing records (``record_routing``) and
    router hooks are unaffected. The switch is process-wide (not per thread): generate in one thread at a time, or
    keep training threads out of the block's lifetime."""
    global _STATISTICS_OFF_DEPTH
    _STATISTICS_OFF_DEPTH += 1
    try:
        yield
    finally:
        _STATISTICS_OFF_DEPTH -= 1


def routed_moe(decide: Callable[..., Routing], decide_args: tuple, cfg: MoEConfig, x: Tensor, valid: Tensor,
               modality: Optional[Tensor], all_valid: bool, fused: Optional[Callable],
               weights: Optional[tuple], activation: str,
               with_aux: bool = True) -> tuple[Tensor, Optional[MoEAux], Routing]:
    """The MoE layer's sparse forward on grouped tokens, one function (the layer compiles it as one graph).

    Args:
        decide, decide_args: the router's decision (:class:`~zoo.moe.routing.RoutingPlan`), over G groups of S.
        x: the grouped tokens flattened, [T, D] (T = G * S); ``valid`` [G, S] bool, ``modality`` [G, S] or None;
            ``all_valid``: ``valid`` is known to be all True.
        fused: the fused expert kernel (``zoo.kernels.fused_moe``) with the experts' stacked ``weights``
            (w1, b1, w2, b2) and ``activation``, or None: then a dispatcher outside this function runs the experts
            (it has data-dependent sizes and host syncs that would break the graph).
    Returns:
        out: the expert output [T, D] on the fused path, else the differentiable combine weights [G, S, K];
        aux: losses and statistics (:class:`MoEAux`); None when ``with_aux`` is False (:func:`routing_statistics_off`);
        routing: the decision, detached (a graph output that requires grad but gets none costs a zero-filled tangent
            per backward: only ``out`` and ``aux.loss`` carry gradients).
    """
    routing = decide(*decide_args)
    if fused is None:
        out = routing.combine_weight
    else:
        K = routing.expert_index.shape[-1]
        out = fused(x, routing.expert_index.reshape(-1, K), routing.combine_weight.reshape(-1, K).to(x.dtype),
                    routing.keep.reshape(-1, K), *weights, activation)
    aux = sparse_aux(routing, cfg, valid, modality, all_valid) if with_aux else None
    return out, aux, routing.detached()


class MoELayer(nn.Module):
    """Mixture-of-Experts MLP.

    Args:
        dim: D, the token width.
        hidden_dim: H, each routed expert's hidden width (and the default shared-expert width per shared expert).
        config: routing, capacity, losses, shared experts and dispatch settings (:class:`MoEConfig`).
        causal: the layer sits in a causal model: every sequence is its own routing group and capacity is filled in
            position order (all k choices of token t before any choice of token t+1; batch priority does not apply),
            so no later token changes an earlier token's output and a sequence's output does not depend on the
            rest of the batch. Expert-choice and Soft MoE routing, and capacity from the valid-token count (which
            depends on the batch), are refused.
        experts: the routed experts, an :class:`~zoo.moe.experts.Experts` with E = ``config.num_experts`` experts of
            width ``dim`` (default: :class:`StackedExperts` of width ``hidden_dim``). The fused GPU path runs only
            where ``experts.stacked()`` gives stacked weights; otherwise the reference dispatchers call the experts.
            Experts may pick their own computation per call (``experts.routed_path()``; LoRA experts: the low-rank
            path while their factors train), which then replaces both (dispatch "auto" / "fused").

    Parameters: ``router.proj.weight [E, D]``, ``experts.{w1, b1, w2, b2}`` (StackedExperts), and with
    ``config.num_shared_experts > 0`` a dense ``shared_expert`` (:class:`~zoo.layers.Mlp`, every token) and, with
    ``config.shared_expert_gate``, ``shared_expert_gate`` (``nn.Linear(D, 1, bias=False)``: Qwen2-MoE's sigmoid gate
    on the shared output).
    """

    def __init__(self, dim: int, hidden_dim: int, config: MoEConfig, *, causal: bool = False,
                 experts: Optional[nn.Module] = None) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MoELayer {name} must be an int >= 1, got {value!r}")
        self.dim, self.hidden_dim, self.config, self.causal = dim, hidden_dim, config, causal
        E = config.num_experts
        if causal:
            if config.router != "topk":
                raise ValueError(
                    f"router={config.router!r} is not causal: it mixes tokens of a sequence (expert choice picks "
                    "tokens by comparing them; Soft MoE slots average them), so later tokens would change earlier "
                    "outputs. Use router='topk' in a causal model.")
            if config.capacity_from_valid_tokens and not (config.dropless and config.eval_dropless is not False):
                raise ValueError(
                    "capacity_from_valid_tokens=True makes the capacity depend on the fullest sequence of the batch, "
                    "so a sequence's output would depend on the other sequences; a causal layer needs "
                    "capacity_from_valid_tokens=False (capacity from the sequence length) or dropless routing.")
            if config.deepspeed_top2_gating != "off" and not config.dropless_always():
                raise ValueError(
                    f"deepspeed_top2_gating={config.deepspeed_top2_gating!r} with a capacity is not causal: DeepSpeed's "
                    "capacity is shared by all tokens of the call, so later tokens (and other sequences) would take "
                    "earlier tokens' slots. In a causal layer use it only dropless (dropless=True and eval_dropless "
                    "None or True), or leave deepspeed_top2_gating='off'.")
        if config.router == "topk":
            self.router = TopKRouter(dim, E, config.noise_std, config.renormalize, config.batch_priority,
                                     config.capacity_multiple_of, config.capacity_from_valid_tokens,
                                     config.min_capacity, config.deepspeed_top2_gating)
        elif config.router == "expert_choice":
            self.router = ExpertChoiceRouter(dim, E, config.noise_std, config.capacity_multiple_of,
                                             config.capacity_from_valid_tokens, config.min_capacity)
        elif config.router == "soft":
            self.router = SoftRouter(dim, E, config.slots_per_expert)
        else:
            raise ValueError(f"unknown router {config.router!r}; expected 'topk', 'expert_choice' or 'soft'")
        if experts is None:
            experts = StackedExperts(E, dim, hidden_dim, config.activation, config.expert_bias)
        elif not isinstance(experts, Experts):
            raise TypeError(f"experts must be a zoo.moe.experts.Experts (the interface the dispatchers call), got "
                            f"{type(experts).__name__}")
        elif (experts.num_experts, experts.dim, experts.hidden_dim) != (E, dim, hidden_dim):
            raise ValueError(f"experts have num_experts={experts.num_experts}, dim={experts.dim}, "
                             f"hidden_dim={experts.hidden_dim}; the layer needs {E}, {dim}, {hidden_dim}")
        self.experts = experts
        self.shared_expert: Optional[Mlp] = None
        self.shared_expert_gate: Optional[nn.Linear] = None
        if config.num_shared_experts > 0:
            width = config.shared_expert_hidden_dim or hidden_dim * config.num_shared_experts
            self.shared_expert = Mlp(dim, width, config.activation, bias=config.expert_bias)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(dim, 1, bias=False)
        self.aux: Optional[MoEAux] = None
        # Reports set record_routing = True to get last_routing (RoutingRecord) after each forward; off: no cost.
        self.record_routing = False
        self.last_routing: Optional[RoutingRecord] = None
        # Expert parallelism hook (set by zoo.distributed.shard_experts): a callable with the dispatcher
        # signature that sends tokens to experts sharded across ranks. None = all experts are local.
        self.expert_dispatcher = None

    # ----------------------------------------------------------------------------------------- grouping
    def _group(self, x: Tensor, valid: Tensor, modality: Optional[Tensor]):
        """[B, S, ...] -> [G, group_size * S, ...], padding the batch with invalid sequences (causal: one sequence
        per group)."""
        B, S, D = x.shape
        gs = 1 if self.causal else self.config.group_size or B
        gs = min(gs, B)
        pad = (-B) % gs
        if pad:
            x = torch.cat([x, x.new_zeros(pad, S, D)])
            valid = torch.cat([valid, valid.new_zeros(pad, S)])
            if modality is not None:
                modality = torch.cat([modality, modality.new_zeros(pad, S)])
        G = (B + pad) // gs
        grouped = (x.reshape(G, gs * S, D), valid.reshape(G, gs * S),
                   None if modality is None else modality.reshape(G, gs * S))
        return grouped, pad

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor, mask: Optional[Tensor] = None, modality: Optional[Tensor] = None) -> Tensor:
        """``x`` [B, S, D]; ``mask`` [B, S] bool, True = real token (default: all); ``modality`` [B, S]
        ids in [0, num_modalities). Returns [B, S, D]; an empty batch (B or S = 0) gives an empty output and no
        ``aux``."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MoELayer expects x of shape [B, S, D={self.dim}], got {tuple(x.shape)}")
        B, S, _ = x.shape
        valid = torch.ones(B, S, dtype=torch.bool, device=x.device) if mask is None else mask.to(torch.bool)
        if valid.shape != (B, S):
            raise ValueError(f"mask must have shape [B, S] = {(B, S)}, got {tuple(valid.shape)}")
        if modality is not None and modality.shape != (B, S):
            raise ValueError(f"modality must have shape [B, S] = {(B, S)}, got {tuple(modality.shape)}")
        self._check_values(x, modality)
        # Drop the last step's outputs first: on the CUDA-graph path their memory is reused once nothing holds them.
        self.aux = None
        self.last_routing = None
        if self.training and _statistics_off():
            raise RuntimeError("an MoE layer in training mode ran inside routing_statistics_off(): its auxiliary loss "
                               "is part of the training objective; use the context for inference (model.eval()) only")
        if B == 0 or S == 0:
            return torch.zeros_like(x)
        (xg, vg, mg), pad = self._group(x, valid, modality)
        # No mask and no padding: every token is valid, so the top-k router, V-MoE's losses and the statistics
        # skip their masking kernels (images are never masked).
        all_valid = mask is None and pad == 0
        if self.config.router == "soft":
            yg, record = self._soft_forward(xg, vg, mg)
        else:
            yg, record = self._sparse_forward(xg, vg, mg, all_valid)
        y = yg.reshape(B + pad, S, self.dim)[:B]
        if self.aux is not None and self.aux.stats is not None:  # documented as [B, S]: ungroup, drop padding
            self.aux.stats.top1_expert = self.aux.stats.top1_expert.reshape(B + pad, S)[:B]
        if record is not None:
            self.last_routing = RoutingRecord(*(None if t is None else t.reshape(B + pad, S, *t.shape[2:])[:B].clone()
                                                for t in record))
        if self.shared_expert is not None:
            y = y + self._shared_forward(x, None if mask is None else valid)
        return y

    def _check_values(self, x: Tensor, modality: Optional[Tensor]) -> None:
        """Dtype checks, and the modality id range as a device-side assert (no host read: on CPU it raises here, on
        an accelerator at the next synchronisation)."""
        weight_dtype = next(self.router.parameters()).dtype
        if not x.is_floating_point():
            raise TypeError(f"MoELayer expects floating-point x, got {x.dtype}; convert it (x.float())")
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x is {x.dtype} but the layer's weights are {weight_dtype}; convert one of them "
                            f"(x.to({weight_dtype}) or layer.to({x.dtype})) or run under torch.autocast")
        if modality is None:
            return
        if modality.is_floating_point() or modality.dtype == torch.bool:
            raise TypeError(f"modality must hold integer ids in [0, num_modalities), got {modality.dtype} "
                            "(modality.long())")
        M = self.config.num_modalities
        message = f"modality ids must be in [0, num_modalities={M}); set MoEConfig.num_modalities or fix the ids"
        try:
            torch._assert_async(((modality >= 0) & (modality < M)).all(), message)
        except RuntimeError as err:  # raised at once on CPU: name the values found (this read is the error path only)
            raise ValueError(f"{message}; got values in [{int(modality.min())}, {int(modality.max())}]") from err

    def _sparse_forward(self, xg: Tensor, vg: Tensor, mg: Optional[Tensor], all_valid: bool):
        """Token-choice or expert-choice routing of groups ``xg`` [G, S, D]: (output [G, S, D], record tensors or
        None)."""
        cfg = self.config
        G, Sg, D = xg.shape
        x = xg.reshape(G * Sg, D)
        k, capacity_factor = cfg.k(self.training), cfg.capacity_setting(self.training)
        plan = self.router.plan(xg, vg, k, capacity_factor, all_valid, causal=self.causal)
        own = self._own_experts_path()
        fused, weights = (None, None) if own is not None else self._fused_experts(x)
        stacked = None if weights is None else (weights.w1, weights.b1, weights.w2, weights.b2)
        activation = cfg.activation if weights is None else weights.activation
        step = maybe_compiled(routed_moe, cfg.compile_routing, x.device, cfg.cuda_graphs)
        out, self.aux, routing = step(plan.decide, plan.args, cfg, x, vg, mg, all_valid, fused, stacked, activation,
                                      not _statistics_off())
        routing = self.router(xg, vg, k, capacity_factor, all_valid, causal=self.causal, decided=routing)  # hooks
        if fused is None:  # out: the combine weights, for the experts' own path or a dispatcher outside the graph
            K = routing.expert_index.shape[-1]
            out = (own or self._dispatch)(x, routing.expert_index.reshape(-1, K), out.reshape(-1, K).to(xg.dtype),
                                          routing.keep.reshape(-1, K))
        record = None
        if self.record_routing:
            record = (routing.clean_probs.float(), vg, mg, routing.expert_index, routing.keep)
        return out.reshape(G, Sg, D), record

    def traces_as_one_graph(self, x: Tensor) -> bool:
        """Whether a training forward on ``x`` [..., D] can be traced into an enclosing graph without a break
        (``DecoderLM.compile_blocks`` compiles a whole decoder then): soft routing, or top-k / expert-choice routing
        on the fused GPU experts. A reference dispatcher reads row counts on the host, and the experts' own path
        (e.g. LoRA factors) runs outside graphs. Asked every training step: it builds no stacked weights (LoRA
        experts merge theirs per call), it reads ``Experts.has_stacked_form``."""
        if self.config.router == "soft":
            return True
        if getattr(self, "expert_dispatcher", None) is not None or self.config.dispatch not in ("auto", "fused"):
            return False
        return (self._own_experts_path() is None and self.experts.has_stacked_form
                and _fused_moe_or_none(x, self.experts.activation) is not None)

    def _own_experts_path(self):
        """The experts' own computation for this call (:meth:`Experts.routed_path`, e.g. LoRA experts' low-rank
        path while their factors train) with dispatch "auto" / "fused" and no expert parallelism hook, else None.
        It runs outside the compiled routing graph, as a dispatcher does."""
        if getattr(self, "expert_dispatcher", None) is not None or self.config.dispatch not in ("auto", "fused"):
            return None
        return self.experts.routed_path()

    def _fused_experts(self, x: Tensor):
        """(fused expert function, the experts' StackedWeights) when this call takes the fused GPU path (dispatch
        "auto"/"fused", no expert parallelism hook, experts with stacked weights, a device and activation the kernel
        supports), else (None, None)."""
        if getattr(self, "expert_dispatcher", None) is not None or self.config.dispatch not in ("auto", "fused"):
            return None, None
        weights = self.experts.stacked()
        fused = None if weights is None else _fused_moe_or_none(x, weights.activation)
        if fused is None and self.config.dispatch == "fused":
            raise RuntimeError(
                "dispatch='fused' needs experts with stacked weights (Experts.stacked()), a CUDA tensor, Triton and "
                f"activation 'gelu_tanh' or 'swiglu'; got experts {type(self.experts).__name__}, device={x.device}, "
                f"dtype={x.dtype}, activation={self.config.activation!r}. "
                "Use dispatch='auto' to fall back to the reference path.")
        return (fused, weights) if fused is not None else (None, None)

    def _dispatch(self, x: Tensor, expert_index: Tensor, combine_weight: Tensor, keep: Tensor) -> Tensor:
        """The experts outside the routing graph: the expert parallelism hook, or a reference dispatcher."""
        if getattr(self, "expert_dispatcher", None) is not None:  # expert parallelism (zoo.distributed)
            return self.expert_dispatcher(x, expert_index, combine_weight, keep, self.experts)
        mode = self.config.dispatch
        if mode == "auto" and not self.training and torch.compiler.is_compiling():
            # A traced inference step (e.g. a compiled decode step): the sorted dispatcher's host-side row counts
            # would break the graph and recompile per routing pattern; the dense dispatcher keeps shapes static.
            return dense_dispatch(x, expert_index, combine_weight, keep, self.experts)
        return DISPATCHERS["sorted" if mode in ("auto", "fused") else mode](x, expert_index, combine_weight, keep,
                                                                            self.experts)

    def _soft_forward(self, xg: Tensor, vg: Tensor, mg: Optional[Tensor]):
        G, Sg, D = xg.shape
        E, P = self.config.num_experts, self.config.slots_per_expert
        dispatch, combine, logits = self.router(xg, vg)  # [G, S, E*P]
        slots = torch.einsum("gsn,gsd->gnd", dispatch.to(xg.dtype), xg)  # [G, E*P, D]
        slots = slots.reshape(G, E, P, D).permute(1, 0, 2, 3).reshape(E, G * P, D)
        out = self.experts.forward_dense(slots).reshape(E, G, P, D).permute(1, 0, 2, 3).reshape(G, E * P, D)
        y = torch.einsum("gsn,gnd->gsd", combine.to(out.dtype), out)
        self.aux = None if _statistics_off() else soft_aux(self.config, dispatch, logits, vg, mg)
        record = None
        if self.record_routing:
            record = (soft_expert_probs(logits.detach(), E).float(), vg, mg, None, None)
        return y, record

    def _shared_forward(self, x: Tensor, valid: Optional[Tensor]) -> Tensor:
        """The shared experts on every token [B, S, D] (Qwen2-MoE: times ``sigmoid(shared_expert_gate(x))``); 0 at
        masked tokens, as the routed output."""
        y = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            y = torch.sigmoid(self.shared_expert_gate(x)) * y
        return y if valid is None else y * valid.unsqueeze(-1).to(y.dtype)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of a model in forward (registration) order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def collect_moe_aux(model: nn.Module) -> tuple[Tensor, dict[str, Tensor], list[RoutingStats]]:
    """Sum the aux losses of every MoE layer that ran in the last forward.

    Returns (weighted total, {loss name: sum over layers}, [stats per MoE layer]).
    """
    total, losses, stats = None, {}, []
    for layer in moe_layers(model):
        if layer.aux is None:
            continue
        total = layer.aux.loss if total is None else total + layer.aux.loss
        for k, v in layer.aux.losses.items():
            losses[k] = v if k not in losses else losses[k] + v
        stats.append(layer.aux.stats)
    if total is None:  # no MoE layer ran: a zero on the model's device (a CPU scalar would need a copy per step)
        param = next(model.parameters(), None)
        total = torch.zeros((), device=None if param is None else param.device)
    return total, losses, stats


def set_eval_overrides(model: nn.Module, capacity_factor: Optional[float] = None, top_k: Optional[int] = None,
                       dropless: Optional[bool] = None) -> None:
    """Change eval-time routing of every MoE layer (V-MoE evaluates with other capacity factors / k).

    One source of truth: the values are written into the :class:`MoEConfig` objects themselves (each layer's, and
    those inside ``model.config``, which the layers share), so ``model.config`` shows them, ``save_pretrained``
    writes them to config.json and a model loaded from there routes the same way. All values are validated before
    anything changes. A config object shared with another model changes there too (build each model from its own
    config to keep them apart)."""
    import dataclasses

    changes = {k: v for k, v in (("eval_capacity_factor", capacity_factor), ("eval_top_k", top_k),
                                 ("eval_dropless", dropless)) if v is not None}
    if not changes:
        return
    found: dict[int, MoEConfig] = {}

    def collect(obj: object) -> None:  # the MoEConfig objects inside a (nested) config dataclass
        if isinstance(obj, MoEConfig):
            found.setdefault(id(obj), obj)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                collect(getattr(obj, f.name))

    collect(getattr(model, "config", None))
    for layer in moe_layers(model):
        collect(layer.config)
    for config in found.values():
        replace(config, **changes)  # validates via __post_init__ before anything is changed
    for config in found.values():
        for key, value in changes.items():
            setattr(config, key, value)
