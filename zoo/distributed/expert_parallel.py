"""Expert parallelism for every :class:`~zoo.moe.MoELayer`: experts sharded over the ranks of an
expert-parallel group, tokens exchanged with ``all_to_all_single``.

    routing (local, per rank, as single-process) -> sort kept slots by expert -> exchange counts
    -> all-to-all tokens to the experts' owners -> local experts (the fused kernel on GPU, as MoELayer)
    -> all-to-all back -> combine

Nothing about routing changes: groups are formed per rank from its own images (as V-MoE does per device),
so routing and capacity are exactly those of a single process that sees the same images in the same
groups. Gradients: each rank's loss is its local mean and DDP averages the shared parameters' gradients
over the ``world_size`` ranks; an expert's gradient on its owner is the SUM of every rank's contribution
(the all-to-all's backward brings them home), so it is scaled by ``1 / world_size``. Together this equals
single-process training on the union of the ranks' batches.

Plain PyTorch use (Lightning: :class:`zoo.distributed.ExpertParallelStrategy` does all of this)::

    dist.init_process_group("nccl")                     # or "gloo" on CPU
    model = zoo.create_model("vmoe_b16").cuda()
    shard_experts(model)                                # rank r keeps experts [r*E/W, (r+1)*E/W)
    ddp = wrap_ddp(model, device_ids=[local_rank])      # DDP that ignores the (rank-owned) experts
    ... loss.backward(); sync_expert_grads(model); opt.step()   # sync only matters with replicas
    torch.save(full_state_dict(model), path)            # collective: gathered expert tensors
"""

from __future__ import annotations

import copy
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from zoo.distributed.comm import (ExpertParallelGroup, all_to_all_autograd, exchange_counts,
                                  expert_parallel_group)
from zoo.moe.experts import StackedExperts
from zoo.moe.layer import MoELayer, moe_layers

_PARAM_NAMES = ("w1", "b1", "w2", "b2")


def _param_order(experts: nn.Module) -> list[str]:
    return list(experts._parameters) + [n for n in _PARAM_NAMES if n not in experts._parameters]


def _accumulate_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class ShardedExperts(StackedExperts):
    """The experts ``[offset, offset + num_experts)`` of a layer's ``num_global_experts`` (one rank's shard).

    Same parameter names as :class:`StackedExperts` (``w1 b1 w2 b2``, leading axis = local experts), so a
    sharded model's parameter names are those of the full model. ``forward_grouped``/``expert`` work on
    LOCAL expert indices; ``forward_dense`` ([E_global, N, D] -> [E_global, N, D], Soft MoE) exchanges the
    slots with the other ranks. Loading a full (unsharded) tensor into it keeps this rank's slice.
    """

    ep: ExpertParallelGroup

    @classmethod
    def from_full(cls, full: StackedExperts, ep: ExpertParallelGroup, grad_scale: float) -> "ShardedExperts":
        E = full.num_experts
        if E % ep.size:
            raise ValueError(f"num_experts={E} must be divisible by the expert-parallel size {ep.size}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        local = E // ep.size
        self.dim, self.hidden_dim, self.activation = full.dim, full.hidden_dim, full.activation
        self.num_experts, self.num_global_experts, self.offset = local, E, ep.rank * local
        self.ep, self.grad_scale = ep, grad_scale
        self.dispatch = "auto"  # the layer's MoEConfig.dispatch, set by shard_experts (fused kernel on CUDA)
        sl = slice(self.offset, self.offset + local)
        for name in _param_order(full):  # the full module's registration order: optimizer state ids match
            p = getattr(full, name)
            setattr(self, name, None if p is None else
                    nn.Parameter(p.detach()[sl].clone(), requires_grad=p.requires_grad))
        self._grad_hooks = [p.register_hook(self._scale_grad) for p in self.parameters() if p.requires_grad]
        return self

    def _scale_grad(self, grad: Tensor) -> Tensor:
        return grad * self.grad_scale if self.grad_scale != 1.0 else grad

    def __deepcopy__(self, memo):  # process groups cannot be deep-copied; share them
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k != "_grad_hooks":
                new.__dict__[k] = v if k == "ep" else copy.deepcopy(v, memo)
        new._grad_hooks = [p.register_hook(new._scale_grad) for p in new.parameters() if p.requires_grad]
        return new

    def extra_repr(self) -> str:
        return (f"experts [{self.offset}, {self.offset + self.num_experts}) of {self.num_global_experts}, "
                f"dim={self.dim}, hidden_dim={self.hidden_dim}, activation={self.activation!r}, "
                f"bias={self.b1 is not None}, {self.ep}")

    def local_slice(self, full: Tensor) -> Tensor:
        return full[self.offset:self.offset + self.num_experts]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in _PARAM_NAMES:
            p, key = getattr(self, name), prefix + name
            t = state_dict.get(key)
            if p is not None and t is not None and t.ndim == p.ndim and t.shape[0] == self.num_global_experts \
                    and t.shape[0] != p.shape[0] and t.shape[1:] == p.shape[1:]:
                state_dict[key] = self.local_slice(t)  # full checkpoint tensor -> this rank's shard
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------ gather (collective over the EP group)
    def gather(self, t: Tensor) -> Tensor:
        """This rank's shard of a tensor with a leading local-expert axis -> the full tensor, on every rank."""
        if self.ep.size == 1:
            return t.detach().clone()
        t = t.detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(self.ep.size)]
        dist.all_gather(parts, t, group=self.ep.group)
        return torch.cat(parts)

    def to_full(self) -> StackedExperts:
        """A :class:`StackedExperts` with every expert (collective)."""
        full = StackedExperts.__new__(StackedExperts)
        nn.Module.__init__(full)
        full.dim, full.hidden_dim, full.activation = self.dim, self.hidden_dim, self.activation
        full.num_experts = self.num_global_experts
        for name in _param_order(self):
            p = getattr(self, name)
            setattr(full, name, None if p is None else nn.Parameter(self.gather(p), requires_grad=p.requires_grad))
        return full

    def fused_kernel(self, x: Tensor):
        """The fused GPU kernel if the layer's dispatch setting and ``x`` allow it (as in ``MoELayer``), else None."""
        if self.dispatch not in ("auto", "fused"):
            return None
        from zoo.moe.layer import _fused_moe_or_none

        fused = _fused_moe_or_none(x, self.activation)
        if fused is None and self.dispatch == "fused":
            raise RuntimeError("dispatch='fused' needs a CUDA tensor, Triton and activation 'gelu_tanh' or 'swiglu'; "
                               f"got device={x.device}, dtype={x.dtype}, activation={self.activation!r}")
        return fused

    def forward_local(self, x: Tensor, expert_ids: Tensor, counts: list[int], fused=None) -> Tensor:
        """This rank's experts on rows sorted by local expert (``expert_ids`` [N], ``counts[e]`` rows each):
        the ``fused`` kernel when given, else one matmul pair per expert."""
        if fused is not None:
            n = x.shape[0]
            ones = torch.ones(n, 1, dtype=x.dtype, device=x.device)
            keep = torch.ones(n, 1, dtype=torch.bool, device=x.device)
            return fused(x, expert_ids.view(n, 1), ones, keep, self.w1, self.b1, self.w2, self.b2, self.activation)
        return self.forward_grouped(x, counts)

    # ----------------------------------------------------------------------------------- Soft MoE slots
    def forward_dense(self, x: Tensor) -> Tensor:
        """Slots of every expert ``[E_global, N, D]`` (N may differ between ranks) -> ``[E_global, N, D]``."""
        E, N, D = x.shape
        if E != self.num_global_experts:
            raise ValueError(f"expected slots for {self.num_global_experts} experts, got {E}")
        W, El = self.ep.size, self.num_experts
        if W == 1:
            return super().forward_dense(x)
        n_recv = exchange_counts(torch.full((W,), N, dtype=torch.long, device=x.device), self.ep.group).tolist()
        send = [El * N] * W
        recv_splits = [El * n for n in n_recv]
        xr = all_to_all_autograd(x.reshape(E * N, D), recv_splits, send, self.ep.group)  # [El*sum(n), D]
        chunks = [c.reshape(El, n, D) for c, n in zip(torch.split(xr, recv_splits), n_recv)]
        y = super().forward_dense(torch.cat(chunks, dim=1))  # [El, sum(n), D]
        back = torch.cat([c.reshape(El * n, D) for c, n in zip(torch.split(y, n_recv, dim=1), n_recv)])
        return all_to_all_autograd(back, send, recv_splits, self.ep.group).reshape(E, N, D)


def expert_parallel_dispatch(x: Tensor, expert_index: Tensor, combine_weight: Tensor, keep: Tensor,
                             experts: ShardedExperts) -> Tensor:
    """The dispatcher contract of ``zoo.moe.dispatch`` (``y [T, D] = sum_k keep * w * expert(x)``) with the
    experts spread over the ranks of ``experts.ep``. Collective: every rank of the group must call it."""
    T, D = x.shape
    K = expert_index.shape[1]
    E, El, W, group = experts.num_global_experts, experts.num_experts, experts.ep.size, experts.ep.group
    flat_expert = torch.where(keep, expert_index, torch.full_like(expert_index, E)).reshape(-1)  # [T*K]
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=E + 1)[:E]  # kept slots per global expert
    recv = exchange_counts(counts, group) if W > 1 else counts  # [W*El]: from rank i, per local expert
    both = torch.stack([counts, recv]).cpu()  # the one host sync: splits drive the exchange
    send_mat, recv_mat = both[0].view(W, El), both[1].view(W, El)
    order = order[:int(send_mat.sum())]
    token = order // K
    x_sorted = x[token]  # kept slots, sorted by global expert = grouped by owner rank
    fused = experts.fused_kernel(x)  # decided on x, as MoELayer does (the kernel ignores autocast)
    if fused is None and torch.is_autocast_enabled(x.device.type):
        x_sorted = x_sorted.to(torch.get_autocast_dtype(x.device.type))  # the matmuls cast anyway: half the bytes
    input_splits, output_splits = send_mat.sum(1).tolist(), recv_mat.sum(1).tolist()
    x_recv = all_to_all_autograd(x_sorted, output_splits, input_splits, group) if W > 1 else x_sorted
    # Arrived rows are ordered (source rank, local expert); the experts want them expert-major.
    local_expert = torch.repeat_interleave(torch.arange(El).repeat(W), recv_mat.reshape(-1)).to(x.device)
    perm = torch.argsort(local_expert, stable=True)
    if int(recv_mat.sum()) > 0:
        y_local = experts.forward_local(x_recv[perm], local_expert[perm], recv_mat.sum(0).tolist(), fused)
    else:
        # No token reached this rank's experts. Keep the received (empty) rows in the graph so that the
        # backward all-to-all runs on every rank (collectives must match), and give the experts a zero
        # gradient, as single-process training does for the untouched rows of the stacked expert tensors.
        y_local = x_recv[perm] * 0
        if torch.is_grad_enabled():
            for p in experts.parameters():
                if p.requires_grad:
                    y_local = y_local + p.sum().to(y_local.dtype) * 0
    y_recv = torch.zeros_like(x_recv, dtype=y_local.dtype).index_copy(0, perm, y_local)
    y_sorted = all_to_all_autograd(y_recv, input_splits, output_splits, group) if W > 1 else y_recv
    acc = _accumulate_dtype(x)
    y_sorted = y_sorted.to(acc) * combine_weight.reshape(-1)[order].unsqueeze(-1).to(acc)
    slots = torch.zeros(T * K, D, dtype=acc, device=x.device).index_copy(0, order, y_sorted)
    return slots.view(T, K, D).sum(dim=1).to(x.dtype)


# ------------------------------------------------------------------------------------ model level
def sharded_experts(model: nn.Module) -> Iterator[tuple[str, ShardedExperts]]:
    """(qualified name, module) of every sharded expert block of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, ShardedExperts):
            yield name, m


def is_sharded(model: nn.Module) -> bool:
    return any(True for _ in sharded_experts(model))


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The rank-owned (sharded) expert parameters: DDP must not all-reduce them."""
    return [p for _, m in sharded_experts(model) for p in m.parameters()]


def shard_experts(model: nn.Module, expert_parallel_size: Optional[int] = None,
                  ep: Optional[ExpertParallelGroup] = None, sync: bool = True,
                  grad_scale: Optional[float] = None) -> ExpertParallelGroup:
    """Shard the experts of every MoE layer of ``model`` over an expert-parallel group (collective).

    Args:
        expert_parallel_size: ranks per EP group (must divide the world size and every layer's E);
            None = all ranks.
        ep: use these groups instead (see :func:`zoo.distributed.comm.expert_parallel_group`).
        sync: first broadcast every layer's full expert tensors from global rank 0, so that all ranks
            shard the same experts (DDP broadcasts the shared parameters itself, but not ignored ones).
        grad_scale: factor on expert gradients; None = ``1 / world_size`` (DDP's averaging of the shared
            parameters; see the module docstring).
    Returns:
        the :class:`ExpertParallelGroup` used.
    """
    ep = ep or expert_parallel_group(expert_parallel_size)
    scale = 1.0 / ep.world_size if grad_scale is None else grad_scale
    layers = [layer for layer in moe_layers(model) if not isinstance(layer.experts, ShardedExperts)]
    for layer in layers:  # validate everything before changing anything
        if layer.config.num_experts % ep.size:
            raise ValueError(f"num_experts={layer.config.num_experts} of an MoE layer is not divisible by the "
                             f"expert-parallel size {ep.size}; choose expert_parallel_size dividing it")
    for layer in layers:
        full = layer.experts
        if sync and ep.world_size > 1:
            for name in _PARAM_NAMES:
                p = getattr(full, name)
                if p is not None:
                    dist.broadcast(p.data, src=0)
        layer.experts = ShardedExperts.from_full(full, ep, scale)
        layer.experts.dispatch = layer.config.dispatch
        if layer.config.router != "soft":  # Soft MoE goes through ShardedExperts.forward_dense
            layer.expert_dispatcher = expert_parallel_dispatch
    return ep


def unshard_experts(model: nn.Module) -> None:
    """Gather every sharded layer's experts back into a full :class:`StackedExperts` (collective)."""
    for layer in moe_layers(model):
        if isinstance(layer.experts, ShardedExperts):
            layer.experts = layer.experts.to_full()
            layer.expert_dispatcher = None


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """DDP over ``model`` that leaves the sharded expert parameters alone."""
    ignore_experts_in_ddp(model)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def ignore_experts_in_ddp(module: nn.Module) -> list[str]:
    """Tell DDP (to be built on ``module``) not to broadcast or all-reduce the sharded expert parameters."""
    ids = {id(p) for p in expert_parameters(module)}
    names = [n for n, p in module.named_parameters() if id(p) in ids]
    previous = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, sorted(set(previous) | set(names)))
    return names


# ----------------------------------------------------------------------------------- checkpoints
def full_state_dict(model: nn.Module, state_dict: Optional[dict] = None) -> dict:
    """``model.state_dict()`` with every sharded expert tensor gathered to its full ``[E, ...]`` form under
    the normal parameter name (collective over the EP group: every rank must call it)."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    for name, m in sharded_experts(model):
        prefix = f"{name}." if name else ""
        for pname in _PARAM_NAMES:
            key = prefix + pname
            if getattr(m, pname) is not None and key in state_dict:
                state_dict[key] = m.gather(state_dict[key])
    return state_dict


def _optimizer_expert_slots(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, ShardedExperts]:
    """Optimizer state index -> owning ShardedExperts, for the sharded expert parameters."""
    owner = {id(p): m for _, m in sharded_experts(model) for p in m.parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {i: owner[id(p)] for i, p in enumerate(params) if id(p) in owner}


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer, model: nn.Module,
                              state_dict: Optional[dict] = None) -> dict:
    """``optimizer.state_dict()`` whose per-parameter tensors of sharded experts (Adam moments, momentum,
    ...) are gathered to full ``[E, ...]`` tensors (collective)."""
    state_dict = optimizer.state_dict() if state_dict is None else state_dict
    slots = _optimizer_expert_slots(optimizer, model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = dict(state_dict["state"])
    # Agree on what to gather: a rank may lack state for a parameter that never had a gradient.
    local = [sorted(k for k, v in state.get(i, {}).items() if torch.is_tensor(v) and v.shape == params[i].shape)
             for i in sorted(slots)]
    for i, keys in zip(sorted(slots), local):
        m = slots[i]
        if m.ep.size > 1:
            everyone: list = [None] * m.ep.size
            dist.all_gather_object(everyone, keys, group=m.ep.group)
            if any(k != keys for k in everyone):
                raise RuntimeError(f"optimizer state of an expert parameter differs between ranks ({everyone}); "
                                   "cannot gather it")
        entry = dict(state.get(i, {}))
        for k in keys:
            entry[k] = m.gather(entry[k])
        if keys:
            state[i] = entry
    return {**state_dict, "state": state}


def shard_optimizer_state_dict(optimizer: torch.optim.Optimizer, model: nn.Module, state_dict: dict) -> dict:
    """The inverse of :func:`full_optimizer_state_dict` for this rank (no communication): full ``[E, ...]``
    state tensors of sharded experts are cut to this rank's experts. Already-sharded ones are kept."""
    slots = _optimizer_expert_slots(optimizer, model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = dict(state_dict.get("state", {}))
    for i, m in slots.items():
        if i not in state:
            continue
        entry = dict(state[i])
        for k, v in entry.items():
            p = params[i]
            if torch.is_tensor(v) and v.ndim == p.ndim and v.shape[0] == m.num_global_experts \
                    and v.shape[0] != p.shape[0] and v.shape[1:] == p.shape[1:]:
                entry[k] = m.local_slice(v).clone()
        state[i] = entry
    return {**state_dict, "state": state}


# ------------------------------------------------------------------------------------- gradients
def sync_expert_grads(model: nn.Module) -> None:
    """Sum the sharded experts' gradients over replica groups (only when the world holds several EP
    groups; a no-op otherwise). Call after backward, before clipping and the optimizer step."""
    for _, m in sharded_experts(model):
        if m.ep.num_replicas <= 1:
            continue
        for p in m.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=m.ep.replica_group)


def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, model: nn.Module,
                    norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` with the norm of the WHOLE model: the sharded experts' share is
    summed over the EP group, so every rank clips by the same factor as single-process training would."""
    params = [p for p in parameters if p.grad is not None]
    owned = {id(p): m for _, m in sharded_experts(model) for p in m.parameters()}
    if norm_type != 2.0:
        raise NotImplementedError("expert-parallel gradient clipping supports the 2-norm only")
    device = params[0].grad.device if params else torch.device("cpu")
    shared = [p.grad for p in params if id(p) not in owned]
    experts = [p.grad for p in params if id(p) in owned]
    sq_shared = torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in shared]).sum() if shared \
        else torch.zeros((), device=device)
    sq_expert = torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in experts]).sum() if experts \
        else torch.zeros((), device=device)
    groups = {id(m.ep.group): m.ep for m in owned.values()}
    for ep in groups.values():  # one EP group per rank in practice
        if ep.size > 1:
            dist.all_reduce(sq_expert, group=ep.group)
    total = torch.sqrt(sq_shared.to(device) + sq_expert.to(device))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
    return total
