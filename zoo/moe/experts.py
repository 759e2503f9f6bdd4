"""The experts seam: what every dispatcher (and the fused GPU path) calls, and the stacked experts that implement it.

:class:`Experts` is the interface. A dispatcher calls ``expert(e, x)`` (the reference loop), ``forward_grouped``
(tokens sorted by expert) or ``forward_dense`` (one buffer per expert, Soft MoE). ``stacked()`` returns the
experts as stacked tensors (:class:`StackedWeights`) when the fused GPU kernel can serve them, else None (then the
layer takes a reference dispatcher). Experts may also choose their own computation for a call: ``routed_path()``
returns a function with the dispatchers' contract that the layer then runs instead of the fused kernel (dispatch
"auto" / "fused"). Other experts plug in by subclassing :class:`Experts`: LoRA experts (Uni-MoE: a frozen FFN,
shared or one per expert, plus per-expert low-rank deltas) implement ``expert``, return their merged weights
(``base + A @ B``) from ``stacked()`` for the fused path in inference, and while their factors train take the
low-rank path (:mod:`zoo.moe.lowrank`) through ``routed_path()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from zoo.layers.activations import apply_activation


@dataclass(frozen=True)
class StackedWeights:
    """E two-layer MLPs as stacked tensors, the layout the fused kernel reads: ``w1 [E, D, H]`` (SwiGLU:
    ``[E, D, 2H]``, gate columns then up columns), ``b1 [E, H or 2H]`` or None, ``w2 [E, H, D]``, ``b2 [E, D]`` or
    None. ``w[e]`` is used as ``x @ w[e]`` (input-major, V-MoE's Flax layout: the transpose of ``nn.Linear``)."""

    w1: Tensor
    b1: Optional[Tensor]
    w2: Tensor
    b2: Optional[Tensor]
    activation: str

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` on tokens ``x`` [N, D] -> [N, D]."""
        h = x @ self.w1[e]
        if self.b1 is not None:
            h = h + self.b1[e]
        y = apply_activation(h, self.activation) @ self.w2[e]
        return y + self.b2[e] if self.b2 is not None else y

    def forward_dense(self, x: Tensor) -> Tensor:
        """Each expert on its own buffer: ``x`` [E, N, D] -> [E, N, D]."""
        h = torch.bmm(x, self.w1)
        if self.b1 is not None:
            h = h + self.b1.unsqueeze(1)
        y = torch.bmm(apply_activation(h, self.activation), self.w2)
        return y + self.b2.unsqueeze(1) if self.b2 is not None else y


class Experts(nn.Module):
    """E experts of width ``dim`` (D) with hidden width ``hidden_dim`` (H): the interface dispatchers call.

    Subclasses implement :meth:`expert`; the other methods have plain defaults built on it. Set ``num_experts``,
    ``dim``, ``hidden_dim`` and ``activation`` (the name the shared expert and reports use).
    """

    num_experts: int
    dim: int
    hidden_dim: int
    activation: str
    # Whether :meth:`stacked` returns weights, known without building them (LoRA experts merge theirs on each call)
    has_stacked_form: bool = False

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` on tokens ``x`` [N, D] -> [N, D]."""
        raise NotImplementedError

    def forward_grouped(self, x_sorted: Tensor, counts: list[int]) -> Tensor:
        """Tokens sorted by expert, ``counts[e]`` rows for expert e: [N, D] -> [N, D]."""
        outs = [self.expert(e, chunk) for e, chunk in enumerate(torch.split(x_sorted, counts)) if chunk.numel()]
        return torch.cat(outs) if outs else x_sorted.new_zeros(0, self.dim)

    def forward_dense(self, x: Tensor) -> Tensor:
        """Each expert on its own buffer: ``x`` [E, N, D] -> [E, N, D] (Soft MoE slots)."""
        return torch.stack([self.expert(e, x[e]) for e in range(self.num_experts)])

    def stacked(self) -> Optional[StackedWeights]:
        """The experts as stacked tensors for the fused GPU kernel, or None when they have no such form."""
        return None

    def routed_path(self) -> Optional[Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]]:
        """The experts' own computation for THIS call, or None (the default: the layer runs the fused kernel on
        :meth:`stacked` where it can, else a reference dispatcher).

        A function ``fn(x [T, D], expert_index [T, K], combine_weight [T, K], keep [T, K]) -> y [T, D]`` with the
        dispatchers' contract (:mod:`zoo.moe.dispatch`); :class:`~zoo.moe.layer.MoELayer` with dispatch "auto" or
        "fused" runs it in place of the fused kernel and the sorted dispatcher (outside the layer's compiled
        routing graph: it may sync with the host). Dispatch "loop" / "sorted" (the reference) and an expert
        parallelism hook ignore it. Asked once per forward, so the answer may depend on the moment (LoRA experts:
        whether their factors train)."""
        return None

    def flops_per_token(self) -> int:
        mult = 3 if self.activation == "swiglu" else 2
        return 2 * mult * self.dim * self.hidden_dim


class StackedExperts(Experts):
    """E two-layer MLP experts with weights stacked on a leading expert axis (:class:`StackedWeights` layout).

    Parameters: ``w1 [E, D, H]`` (SwiGLU: ``[E, D, 2H]``, gate columns then up columns), ``b1 [E, H']``,
    ``w2 [E, H, D]``, ``b2 [E, D]`` (biases optional). Activation "gelu", "gelu_tanh" or "swiglu".
    """

    has_stacked_form = True

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "gelu_tanh",
                 bias: bool = True) -> None:
        super().__init__()
        apply_activation(torch.zeros(1, 2), activation)  # validate the name early
        self.num_experts, self.dim, self.hidden_dim, self.activation = num_experts, dim, hidden_dim, activation
        h1 = 2 * hidden_dim if activation == "swiglu" else hidden_dim
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, h1))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b1: Optional[nn.Parameter] = nn.Parameter(torch.zeros(num_experts, h1)) if bias else None
        self.b2: Optional[nn.Parameter] = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init for every expert family member as a dense timm/ViT MLP: trunc normal 0.02, zero bias.
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)
        if self.b1 is not None:
            nn.init.zeros_(self.b1)
            nn.init.zeros_(self.b2)

    def stacked(self) -> StackedWeights:
        return StackedWeights(self.w1, self.b1, self.w2, self.b2, self.activation)

    def expert(self, e: int, x: Tensor) -> Tensor:
        return self.stacked().expert(e, x)

    def forward_dense(self, x: Tensor) -> Tensor:
        return self.stacked().forward_dense(x)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation!r}, bias={self.b1 is not None}")

    def load_dense(self, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                   fc2_bias: Optional[Tensor]) -> None:
        """Make every expert a copy of a dense MLP given as ``nn.Linear`` weights (sparse upcycling)."""
        with torch.no_grad():
            if tuple(fc1_weight.shape) != (self.w1.shape[2], self.dim) or tuple(fc2_weight.shape) != (self.dim, self.hidden_dim):
                raise ValueError(
                    f"dense MLP shapes fc1 {tuple(fc1_weight.shape)}, fc2 {tuple(fc2_weight.shape)} do not match "
                    f"experts (D={self.dim}, H={self.hidden_dim}, activation={self.activation})")
            self.w1.copy_(fc1_weight.t().unsqueeze(0).expand_as(self.w1))
            self.w2.copy_(fc2_weight.t().unsqueeze(0).expand_as(self.w2))
            if self.b1 is not None:
                if fc1_bias is None or fc2_bias is None:
                    raise ValueError("experts have biases but the dense MLP has none")
                self.b1.copy_(fc1_bias.unsqueeze(0).expand_as(self.b1))
                self.b2.copy_(fc2_bias.unsqueeze(0).expand_as(self.b2))



class LoRAExperts(Experts):
    """E experts, each a FROZEN two-layer FFN plus its own trainable low-rank deltas (Uni-MoE, r=8, alpha=16):
    expert e's weights are ``base1(e) + s A1[e] B1[e]`` and ``base2(e) + s A2[e] B2[e]``, ``s = alpha / r``.

    The frozen base is either ONE FFN shared by every expert (``per_expert_base=False``, Uni-MoE v2: LoRA experts
    around the dense FFN, :meth:`from_dense`) or one FFN per expert (``per_expert_base=True``, Uni-MoE v1 stage 3:
    expert e starts from modality e's stage-2 FFN, :meth:`from_experts` wraps existing stacked experts, e.g. after
    :func:`zoo.models.expert_files.init_experts_from_files`).

    Parameters: frozen ``w1 [D, H']`` (per-expert base: ``[E, D, H']``; SwiGLU ``H' = 2H``, gate columns then up
    columns: LoRA on the gate and up projections is one delta on this fused matrix whose rank-r factors are per
    projection, see below), ``w2 [H, D]`` (``[E, H, D]``), optional frozen ``b1 [H']`` / ``b2 [D]`` (``[E, H']`` /
    ``[E, D]``): the per-expert base has exactly the names and shapes of :class:`StackedExperts`, so a stacked
    state dict loads into it; trainable ``lora_a1 [E, D, r']``, ``lora_b1 [E, r', H']``, ``lora_a2 [E, H, r]``,
    ``lora_b2 [E, r, D]``, the ``b`` factors zero-initialised so every expert starts as its base. For SwiGLU
    ``r' = 2r`` with ``lora_b1`` block-diagonal in use (gate rank r -> gate columns, up rank r -> up columns): that
    is exactly separate rank-r LoRA on ``gate_proj`` and ``up_proj`` as the official PEFT setup has it;
    :meth:`stacked` enforces the block structure by masking.

    Two computations, chosen per call (``benchmarks/results/lora_experts.md`` measured both on an H200):

    * while the factors TRAIN (:meth:`lowrank_active`: autograd enabled, a LoRA factor requires grad, the base
      frozen), :meth:`routed_path` gives the low-rank path (:func:`zoo.moe.lowrank.lowrank_moe`): frozen base
      GEMMs plus one masked GEMM per low-rank product for all experts, never materialising [E, D, H'] weights:
      1.17-2.33x faster per training step than merging every step and 1.65-4.08x less peak memory;
    * otherwise (inference, ``no_grad``, frozen factors, or a base that trains) the layer reads :meth:`stacked`,
      the merged per-expert weights ``base + s A B`` (differentiable in every tensor that requires grad) on the
      fused kernel, the fastest inference path. With ``cache_merge = True`` (off by default: the merge is E full
      FFNs per layer, 1-2 GB per Uni-MoE layer) eval-mode merges are kept while their inputs do not change
      (:meth:`stacked`), e.g. across decode steps.

    :meth:`merged` gives plain :class:`StackedExperts` for inference.
    """

    has_stacked_form = True

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "swiglu", bias: bool = False,
                 r: int = 8, alpha: float = 16.0, per_expert_base: bool = False) -> None:
        super().__init__()
        apply_activation(torch.zeros(1, 2), activation)
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.num_experts, self.dim, self.hidden_dim, self.activation = num_experts, dim, hidden_dim, activation
        self.r, self.alpha, self.scaling = int(r), float(alpha), float(alpha) / int(r)
        self.per_expert_base = bool(per_expert_base)
        gated = activation == "swiglu"
        h1, r1 = (2 * hidden_dim, 2 * r) if gated else (hidden_dim, r)
        lead = (num_experts,) if self.per_expert_base else ()
        self.w1 = nn.Parameter(torch.empty(*lead, dim, h1), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(*lead, hidden_dim, dim), requires_grad=False)
        self.b1 = nn.Parameter(torch.zeros(*lead, h1), requires_grad=False) if bias else None
        self.b2 = nn.Parameter(torch.zeros(*lead, dim), requires_grad=False) if bias else None
        self.lora_a1 = nn.Parameter(torch.empty(num_experts, dim, r1))
        self.lora_b1 = nn.Parameter(torch.zeros(num_experts, r1, h1))
        self.lora_a2 = nn.Parameter(torch.empty(num_experts, hidden_dim, r))
        self.lora_b2 = nn.Parameter(torch.zeros(num_experts, r, dim))
        self.register_buffer("_b1_mask", self._lora_b1_mask(), persistent=False)
        # Opt-in (a plain attribute, not in the state dict): keep the eval-mode merge between calls (stacked()).
        # Off by default: it keeps E merged FFNs resident per layer (1-2 GB per Uni-MoE layer, x 32 layers).
        self.cache_merge = False
        self._merge_cache: Optional[tuple] = None  # (key, held tensors, StackedWeights): see stacked()
        self.reset_parameters()

    def _lora_b1_mask(self) -> Tensor:
        """``[r', H']`` ones where ``lora_b1`` may be non-zero (SwiGLU: gate factors only reach gate columns, up
        factors only up columns)."""
        r, hidden_dim = self.r, self.hidden_dim
        gated = self.activation == "swiglu"
        h1, r1 = (2 * hidden_dim, 2 * r) if gated else (hidden_dim, r)
        block = torch.ones(r1, h1)
        if gated:
            block.zero_()
            block[:r, :hidden_dim] = 1
            block[r:, hidden_dim:] = 1
        return block

    def reset_buffers(self) -> None:
        """Re-create the mask on the CPU (after a build on the meta device, :func:`zoo.convert.empty_init`)."""
        with torch.device("cpu"):
            self._b1_mask = self._lora_b1_mask()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as PEFT's Kaiming-uniform on [r, in] (bound 1/sqrt(in)); B zero: every expert computes its base."""
        for a in (self.lora_a1, self.lora_a2):
            nn.init.uniform_(a, -1 / math.sqrt(a.shape[1]), 1 / math.sqrt(a.shape[1]))
        nn.init.zeros_(self.lora_b1)
        nn.init.zeros_(self.lora_b2)

    def lora_parameters(self) -> list[nn.Parameter]:
        """The trainable low-rank factors (the ``lora`` freeze group); the base is frozen."""
        return [self.lora_a1, self.lora_b1, self.lora_a2, self.lora_b2]

    @classmethod
    def from_dense(cls, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                   fc2_bias: Optional[Tensor], num_experts: int, activation: str, r: int = 8,
                   alpha: float = 16.0) -> "LoRAExperts":
        """LoRA experts whose ONE shared frozen base is a dense FFN given as ``nn.Linear`` weights (``fc1 [H', D]``,
        ``fc2 [D, H]``), e.g. the stage-2 FFN of Uni-MoE."""
        dim, hidden = fc2_weight.shape
        out = cls(num_experts, dim, hidden, activation, bias=fc1_bias is not None, r=r, alpha=alpha)
        out = out.to(device=fc1_weight.device, dtype=fc1_weight.dtype)
        with torch.no_grad():
            out.w1.copy_(fc1_weight.t())
            out.w2.copy_(fc2_weight.t())
            if fc1_bias is not None:
                out.b1.copy_(fc1_bias)
                out.b2.copy_(fc2_bias)
        return out

    @classmethod
    def from_experts(cls, experts: StackedExperts, r: int = 8, alpha: float = 16.0) -> "LoRAExperts":
        """LoRA experts whose per-expert frozen bases are copies of ``experts``' weights (Uni-MoE v1 stage 3: the
        experts as :func:`zoo.models.expert_files.init_experts_from_files` left them); every expert starts equal
        to its original. Same device and dtype as ``experts``."""
        if not isinstance(experts, StackedExperts):
            raise TypeError(f"from_experts wraps StackedExperts, got {type(experts).__name__}")
        out = cls(experts.num_experts, experts.dim, experts.hidden_dim, experts.activation,
                  bias=experts.b1 is not None, r=r, alpha=alpha, per_expert_base=True)
        out = out.to(device=experts.w1.device, dtype=experts.w1.dtype)
        with torch.no_grad():
            for mine, theirs in ((out.w1, experts.w1), (out.w2, experts.w2), (out.b1, experts.b1),
                                 (out.b2, experts.b2)):
                if mine is not None:
                    mine.copy_(theirs)
        return out

    def _base(self, t: Optional[Tensor], e: Optional[int] = None) -> Optional[Tensor]:
        """Base tensor ``t`` for expert ``e`` (``e=None``: for all experts, stacked on a leading axis)."""
        if t is None:
            return None
        if e is not None:
            return t[e] if self.per_expert_base else t
        return t if self.per_expert_base else t.unsqueeze(0).expand(self.num_experts, *t.shape)

    def _frozen_base(self) -> bool:
        return not any(t is not None and t.requires_grad for t in (self.w1, self.w2, self.b1, self.b2))

    def lowrank_active(self) -> bool:
        """Whether this call trains the factors through the low-rank path: autograd records, a LoRA factor
        requires grad, and the base is frozen (the low-rank path gives no per-expert base weight gradients; an
        unfrozen base takes the differentiable merge of :meth:`stacked` instead)."""
        return (torch.is_grad_enabled() and any(p.requires_grad for p in self.lora_parameters())
                and self._frozen_base())

    def routed_path(self):
        """:func:`zoo.moe.lowrank.lowrank_moe` on these experts while :meth:`lowrank_active`, else None (the layer
        then serves :meth:`stacked`'s merged weights to the fused kernel, or a reference dispatcher)."""
        if not self.lowrank_active():
            return None
        from zoo.moe.lowrank import lowrank_moe

        return lambda x, expert_index, combine_weight, keep: lowrank_moe(self, x, expert_index, combine_weight, keep)

    def _merge_inputs(self) -> list[Tensor]:
        return [t for t in (self.w1, self.w2, self.b1, self.b2, *self.lora_parameters(), self._b1_mask)
                if t is not None]

    def stacked(self) -> StackedWeights:
        """The merged per-expert weights ``w1 [E, D, H'] = base1 + s A1 (B1 * mask)``, ``w2 [E, H, D] = base2 +
        s A2 B2`` (biases expanded to [E, ...]), differentiable in whatever requires grad.

        With ``cache_merge = True`` (off by default: the cache keeps E merged FFNs resident per layer; use it where
        that memory is there, e.g. generation; :meth:`merged` is the explicit alternative), the merge is cached in
        eval mode when nothing in it records a gradient (inference serves the same merged weights every call, e.g.
        every decode step): the cache is used while every input tensor is the same memory at the
        same autograd version counter (``_version``: in-place updates, ``load_state_dict`` and optimizer steps
        bump it), with the same dtype, scaling and inference-mode state. It holds references to those tensors, so
        a freed tensor's address cannot be reused by a new one while cached. Cleared by ``train()`` / ``eval()``,
        ``.to()`` and friends, and :meth:`clear_merged_cache`; never pickled or deep-copied. Writes that bypass the
        version counter (``p.data.copy_(...)``, a collective writing into a flat buffer behind the parameter) are
        NOT seen: call :meth:`clear_merged_cache` after them."""
        inputs = self._merge_inputs()
        cacheable = (getattr(self, "cache_merge", False) and not self.training
                     and not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)))
        if not cacheable:
            self._merge_cache = None
            return self._merge()
        try:
            key = (self.scaling, torch.is_inference_mode_enabled(),
                   tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in inputs))
        except RuntimeError:  # inference tensors (created in inference mode) have no version counter: no cache
            self._merge_cache = None
            return self._merge()
        cache = getattr(self, "_merge_cache", None)  # a module pickled before the cache existed has none
        if cache is not None and cache[0] == key:
            return cache[2]
        self._merge_cache = None  # free the stale merge before building the new one
        with torch.no_grad():
            sw = self._merge()
        self._merge_cache = (key, [t.detach() for t in inputs], sw)
        return sw

    def _merge(self) -> StackedWeights:
        s = self.scaling
        w1 = self._base(self.w1) + s * torch.bmm(self.lora_a1, self.lora_b1 * self._b1_mask)
        w2 = self._base(self.w2) + s * torch.bmm(self.lora_a2, self.lora_b2)
        return StackedWeights(w1, self._base(self.b1), w2, self._base(self.b2), self.activation)

    def clear_merged_cache(self) -> None:
        """Drop the cached merge of :meth:`stacked` (and the references it holds)."""
        self._merge_cache = None

    def train(self, mode: bool = True) -> "LoRAExperts":
        self._merge_cache = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self._merge_cache = None  # .to() / .half() / .cuda(): the cached merge is of the old tensors
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_merge_cache"] = None
        return state

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` without materialising its weights: base FFN plus the low-rank paths."""
        s = self.scaling
        h = x @ self._base(self.w1, e) + s * ((x @ self.lora_a1[e]) @ (self.lora_b1[e] * self._b1_mask))
        if self.b1 is not None:
            h = h + self._base(self.b1, e)
        a = apply_activation(h, self.activation)
        y = a @ self._base(self.w2, e) + s * ((a @ self.lora_a2[e]) @ self.lora_b2[e])
        return y + self._base(self.b2, e) if self.b2 is not None else y

    def merged(self) -> StackedExperts:
        """Plain stacked experts with the deltas folded in (inference: no LoRA matmuls)."""
        sw = self.stacked()
        out = StackedExperts(self.num_experts, self.dim, self.hidden_dim, self.activation, bias=self.b1 is not None)
        out = out.to(device=self.w1.device, dtype=self.w1.dtype)
        with torch.no_grad():
            out.w1.copy_(sw.w1)
            out.w2.copy_(sw.w2)
            if sw.b1 is not None:
                out.b1.copy_(sw.b1)
                out.b2.copy_(sw.b2)
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation!r}, bias={self.b1 is not None}, r={self.r}, alpha={self.alpha}, "
                f"per_expert_base={self.per_expert_base}")
