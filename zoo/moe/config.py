"""The one config of an MoE layer, shared by every model family."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args
from typing import Literal, Optional

RouterType = Literal["topk", "expert_choice", "soft"]
Activation = Literal["gelu", "gelu_tanh", "swiglu"]
DispatchType = Literal["auto", "loop", "sorted", "fused"]
DeepSpeedTop2Gating = Literal["off", "argmax", "gumbel"]


@dataclass
class MoEConfig:
    """How an MoE layer routes, computes and regularises.

    Defaults are V-MoE's (Riquelme et al. 2021): noisy top-2 of 8 with noise std ``1/E``, capacity factor
    1.05 rounded up to a multiple of 4, groups of 8 images, importance + load losses at 0.005 each.

    Attributes:
        num_experts: E.
        top_k: k used in training (token-choice router).
        eval_top_k: k used in eval mode; None = ``top_k``.
        router: "topk" (tokens choose experts), "expert_choice" (each expert takes its top-C tokens) or
            "soft" (Soft MoE slots).
        noise_std: training-time Gaussian noise on the router logits has std ``noise_std / num_experts``.
        renormalize: divide the k combine weights of a token by their sum (Mixtral/MoE-LLaVA); V-MoE does not.
        batch_priority: order the tokens of a group by their top-1 weight before filling capacity (BPR). Does not
            apply in a causal layer (``MoELayer(causal=True)`` fills capacity in position order).
        capacity_factor: per-group, per-expert buffer ``ceil(S * k * cf / E)`` rounded up to
            ``capacity_multiple_of``.
        dropless: no capacity limit in training (every valid token reaches its k experts).
        eval_capacity_factor / eval_dropless: the same in eval mode; None = as in training.
        capacity_multiple_of: round capacity up to a multiple of this (V-MoE: 4). 0 or 1 = no rounding.
        group_size: number of consecutive sequences (images) whose tokens are routed together as one group;
            None = the whole batch is one group.
        activation: expert MLP activation.
        expert_bias: experts have biases (V-MoE: yes; SwiGLU LMs: no).
        slots_per_expert: Soft MoE slots per expert.
        dispatch: "auto" (fused kernel on CUDA when it supports the case, else "sorted"), "loop"
            (per-expert loop, the ground truth), "sorted" (sort/gather/scatter), "fused" (require the kernel).
            With "auto" and "fused", experts that choose their own computation for a call
            (``Experts.routed_path()``: LoRA experts while their factors train, the low-rank path) run it instead.
        num_modalities: M, the number of modality ids tokens may carry (per-modality losses and statistics).
        *_weight: weights of the auxiliary losses; 0 switches a loss off (it is still reported when cheap).
        global_entropy_min_experts: LIMoE's threshold ``tau = log(this)``: the global entropy loss is zero
            once a modality spreads over at least this many experts.
        local_entropy_weight_by_modality / global_entropy_weight_by_modality /
        global_entropy_min_experts_by_modality: optional per-modality values (length ``num_modalities``) that
            replace the scalar above for each modality id (LIMoE regularises image and text tokens
            differently); None = the scalar for every modality.
        capacity_from_valid_tokens: compute the per-group capacity from the number of valid (unmasked) tokens
            of the fullest group instead of the group length S, so padding neither takes nor adds capacity
            (LIMoE text). False keeps V-MoE's ``ceil(S * k * cf / E)``. A causal layer refuses it with capacity
            (the fullest sequence of the batch would set every sequence's capacity).
        num_shared_experts: dense experts every token goes through besides its routed ones (Qwen2-MoE, DeepSeek-MoE);
            0 = none. They are one MLP (``MoELayer.shared_expert``) of width ``shared_expert_hidden_dim``.
        shared_expert_hidden_dim: that MLP's hidden width; None = the routed experts' width times
            ``num_shared_experts``.
        shared_expert_gate: multiply the shared output by ``sigmoid(Linear(D, 1, bias=False)(x))`` (Qwen2-MoE).
        compile_routing: run the layer's routed forward (router decision, auxiliary losses / statistics and, on the
            fused path, the experts: :func:`zoo.moe.layer.routed_moe`) as one ``torch.compile`` graph
            (:mod:`zoo.moe.compiled`): None = on CUDA only (where eager launches of their small kernels slow the
            step), True = also on CPU, False = never. Same results either way (tested).
        deepspeed_top2_gating: a REPRODUCTION QUIRK, off by default: route as DeepSpeed 0.9.5's ``top2gating`` did
            in MoE-LLaVA's official training and evaluation (:func:`zoo.moe.routing.deepspeed_top2_route`). "off" =
            the zoo's top-k routing. "gumbel" = DeepSpeed's own behaviour: expert 1 = argmax of the softmax, expert
            2 = argmax of the logits plus Gumbel noise with expert 1 excluded, noise drawn in training AND eval (so
            evaluation is random; the draws come from ``TopKRouter.generator``, else the global RNG, so a seeded
            run is reproducible); capacity ``ceil(T / E * capacity_factor * 2)`` (float32, as DeepSpeed), at least
            ``min_capacity``, over all T tokens of the group, slots given in token order with every first choice
            before any second choice, slots past capacity dropped, and the two kept gates renormalised AFTER
            dropping (a token that keeps one expert gets weight 1 on it). "argmax" = the same without the noise
            (2nd expert = 2nd-highest logit). Needs router "topk", top_k 2 (eval_top_k None or 2), noise_std 0,
            renormalize True and batch_priority False; with a capacity (not dropless) also group_size None (the whole
            call is one group, as DeepSpeed) and capacity_multiple_of 0 or 1 (DeepSpeed does not round). A causal
            layer refuses it unless dropless in training and eval (the whole-call capacity lets later tokens, and
            other sequences, take earlier tokens' slots). Masked tokens take no slot (DeepSpeed routes padding).
            Each call draws its own noise: decoding with a KV cache (one token per call) and a full forward of the
            same tokens see different draws, as DeepSpeed's would.
        target_expert_loss_weight: Uni-MoE v2's per-modality target-expert L1 loss
            (:func:`zoo.moe.losses.target_expert_loss`, reported as "target_expert_loss"); 0 = off. Needs
            ``target_experts_by_modality``.
        target_experts_by_modality: for each modality id (length ``num_modalities``) the expert ids its tokens are
            pulled towards, e.g. ``((), (0, 1), (2,), (3,))`` for Uni-MoE's text / image / video / audio; an empty
            tuple = no target for that modality (text in Uni-MoE v2).
        cross_modality_kl_weight: Uni-MoE v2's cross-modality KL loss (:func:`zoo.moe.losses.cross_modality_kl_loss`,
            reported as "cross_modality_kl_loss"), which drives the modalities' mean routing distributions apart;
            0 = off. Needs ``num_modalities >= 2`` and modality ids at every call.
        cross_modality_kl_pairs: the (a, b) modality pairs it compares (KL of b's from a's); None = every pair
            a < b. Uni-MoE v2's own pairs in the zoo's ids (0 text, 1 image, 2 video, 3 audio):
            ``((1, 3), (1, 0), (3, 0), (3, 2), (2, 0))``.
        min_capacity: the per-group, per-expert capacity is at least this (DeepSpeed's ``min_capacity``; MoE-LLaVA
            trains with 0). 0 = no minimum (capacity is always at least 1).
        cuda_graphs: replay that compiled graph (on the fused GPU path: routing, losses, statistics and the expert
            kernels of the layer) as a CUDA graph, forward and backward (``torch.compile`` mode "reduce-overhead");
            None = wherever it is compiled on CUDA, False = never. Outputs of a step stay valid until the next
            training step's forward; forward-only loops under autograd mark their steps (:mod:`zoo.moe.compiled`).
    """

    num_experts: int = 8
    top_k: int = 2
    eval_top_k: Optional[int] = None
    router: RouterType = "topk"
    noise_std: float = 1.0
    renormalize: bool = False
    batch_priority: bool = True
    capacity_factor: float = 1.05
    dropless: bool = False
    eval_capacity_factor: Optional[float] = None
    eval_dropless: Optional[bool] = None
    capacity_multiple_of: int = 4
    group_size: Optional[int] = 8
    activation: Activation = "gelu_tanh"
    expert_bias: bool = True
    slots_per_expert: int = 1
    dispatch: DispatchType = "auto"
    num_modalities: int = 1
    importance_loss_weight: float = 0.005
    load_loss_weight: float = 0.005
    switch_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    local_entropy_weight: float = 0.0
    global_entropy_weight: float = 0.0
    global_entropy_min_experts: float = 1.0
    local_entropy_weight_by_modality: Optional[tuple[float, ...]] = None
    global_entropy_weight_by_modality: Optional[tuple[float, ...]] = None
    global_entropy_min_experts_by_modality: Optional[tuple[float, ...]] = None
    capacity_from_valid_tokens: bool = False
    num_shared_experts: int = 0
    shared_expert_hidden_dim: Optional[int] = None
    shared_expert_gate: bool = False
    compile_routing: Optional[bool] = None
    cuda_graphs: Optional[bool] = None
    deepspeed_top2_gating: DeepSpeedTop2Gating = "off"
    min_capacity: int = 0
    target_expert_loss_weight: float = 0.0
    target_experts_by_modality: Optional[tuple[tuple[int, ...], ...]] = None
    cross_modality_kl_weight: float = 0.0
    cross_modality_kl_pairs: Optional[tuple[tuple[int, int], ...]] = None

    def __post_init__(self) -> None:
        from zoo.config import check_field_types

        if self.capacity_factor is None:  # the likely meaning ("no limit") has its own setting: say which
            raise ValueError("capacity_factor=None: capacity_factor must be a number; use dropless=True for "
                             "unbounded capacity")
        for name, kind in (("router", RouterType), ("activation", Activation), ("dispatch", DispatchType),
                           ("deepspeed_top2_gating", DeepSpeedTop2Gating)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {get_args(kind)}")
        check_field_types(self)  # a config built in Python gets the type checks a YAML one gets in from_dict
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        for name in ("top_k", "eval_top_k"):
            k = getattr(self, name)
            if k is not None and not 1 <= k <= self.num_experts:
                raise ValueError(f"{name} must be in [1, num_experts={self.num_experts}], got {k}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            cf = getattr(self, name)
            if cf is not None and not (math.isfinite(cf) and cf > 0):
                raise ValueError(f"{name} must be > 0 and finite (use dropless=True for unbounded capacity), "
                                 f"got {cf}")
        if self.capacity_multiple_of < 0:
            raise ValueError(f"capacity_multiple_of must be >= 0 (0 or 1 = no rounding), got "
                             f"{self.capacity_multiple_of}")
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0 (0 = no router noise), got {self.noise_std}")
        for name in ("importance_loss_weight", "load_loss_weight", "switch_loss_weight", "z_loss_weight",
                     "local_entropy_weight", "global_entropy_weight", "target_expert_loss_weight",
                     "cross_modality_kl_weight"):
            weight = getattr(self, name)
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (0 switches the loss off), got {weight}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0 (0 = no minimum), got {self.min_capacity}")
        self._check_deepspeed_top2()
        self._check_modality_losses()
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.shared_expert_hidden_dim is not None and self.shared_expert_hidden_dim < 1:
            raise ValueError(f"shared_expert_hidden_dim must be >= 1 or None, got {self.shared_expert_hidden_dim}")
        if self.num_shared_experts == 0 and (self.shared_expert_hidden_dim is not None or self.shared_expert_gate):
            raise ValueError("shared_expert_hidden_dim / shared_expert_gate are set but num_shared_experts=0: "
                             "set num_shared_experts >= 1 to add shared experts")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1 or None (whole batch), got {self.group_size}")
        if self.num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {self.num_modalities}")
        if self.global_entropy_min_experts < 1:
            raise ValueError(f"global_entropy_min_experts must be >= 1 (tau = log of it), got "
                             f"{self.global_entropy_min_experts}")
        if self.slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be >= 1, got {self.slots_per_expert}")
        for name in ("local_entropy_weight", "global_entropy_weight", "global_entropy_min_experts"):
            values = getattr(self, f"{name}_by_modality")
            if values is None:
                continue
            values = tuple(float(v) for v in values)
            setattr(self, f"{name}_by_modality", values)
            if len(values) != self.num_modalities:
                raise ValueError(f"{name}_by_modality needs num_modalities={self.num_modalities} values, "
                                 f"got {len(values)}")
            low = 1.0 if name == "global_entropy_min_experts" else 0.0
            if min(values) < low:
                raise ValueError(f"{name}_by_modality values must be >= {low}, got {values}")

    def _check_deepspeed_top2(self) -> None:
        """``deepspeed_top2_gating`` fixes the settings DeepSpeed's top2gating has no choice of: name every one that
        contradicts it, at once."""
        if self.deepspeed_top2_gating == "off":
            return
        wrong = []
        for name, ok, need in (("router", self.router == "topk", "'topk'"),
                               ("top_k", self.top_k == 2, "2"),
                               ("eval_top_k", self.eval_top_k in (None, 2), "None or 2"),
                               ("noise_std", self.noise_std == 0, "0 (top2gating adds no Gaussian noise)"),
                               ("renormalize", self.renormalize, "True (the kept gates are renormalised)"),
                               ("batch_priority", not self.batch_priority, "False (slots go in token order)")):
            if not ok:
                wrong.append(f"{name}={getattr(self, name)!r} (needs {need})")
        if self.capacity_setting(True) is not None or self.capacity_setting(False) is not None:
            if self.group_size is not None:
                wrong.append(f"group_size={self.group_size!r} (needs None: DeepSpeed's capacity is over the whole call;"
                             " or make training and eval dropless)")
            if self.capacity_multiple_of > 1:
                wrong.append(f"capacity_multiple_of={self.capacity_multiple_of} (needs 0 or 1: DeepSpeed does not "
                             "round the capacity)")
        if wrong:
            raise ValueError(f"deepspeed_top2_gating={self.deepspeed_top2_gating!r} reproduces DeepSpeed 0.9.5's "
                             "top2gating, which these settings contradict: " + "; ".join(wrong))

    def _check_modality_losses(self) -> None:
        """The Uni-MoE v2 losses' settings: expert and modality ids in range, no duplicates, a router they apply to."""
        M, E = self.num_modalities, self.num_experts
        uses = [name for name in ("target_expert_loss_weight", "cross_modality_kl_weight") if getattr(self, name) > 0]
        if uses and self.router == "soft":
            raise ValueError(f"{', '.join(uses)} > 0 but router='soft' has no auxiliary losses; use router='topk' or "
                             "'expert_choice', or set the weight to 0")
        targets = self.target_experts_by_modality
        if targets is not None:
            if len(targets) != M:
                raise ValueError(f"target_experts_by_modality needs num_modalities={M} entries (one tuple of expert "
                                 f"ids per modality, () = none), got {len(targets)}")
            for m, ids in enumerate(targets):
                if any(not 0 <= e < E for e in ids) or len(set(ids)) != len(ids):
                    raise ValueError(f"target_experts_by_modality[{m}]={tuple(ids)}: expert ids must be distinct and "
                                     f"in [0, num_experts={E})")
        if self.target_expert_loss_weight > 0 and (targets is None or not any(targets)):
            raise ValueError("target_expert_loss_weight > 0 needs target_experts_by_modality with at least one "
                             "modality's target experts")
        pairs = self.cross_modality_kl_pairs
        if pairs is not None:
            for pair in pairs:
                if len(pair) != 2 or pair[0] == pair[1] or not all(0 <= m < M for m in pair):
                    raise ValueError(f"cross_modality_kl_pairs entry {tuple(pair)}: needs two different modality ids "
                                     f"in [0, num_modalities={M})")
            if len(set(map(tuple, pairs))) != len(pairs) or not pairs:
                raise ValueError(f"cross_modality_kl_pairs={pairs}: needs at least one pair and no duplicates")
        if self.cross_modality_kl_weight > 0 and M < 2:
            raise ValueError(f"cross_modality_kl_weight > 0 compares modalities but num_modalities={M}; set "
                             "num_modalities >= 2")

    def target_expert_matrix(self) -> list[list[float]]:
        """[M][E]: 1.0 at each modality's target experts (``target_experts_by_modality``), else 0."""
        targets = self.target_experts_by_modality or ((),) * self.num_modalities
        return [[1.0 if e in ids else 0.0 for e in range(self.num_experts)] for ids in targets]

    def kl_pairs(self) -> list[tuple[int, int]]:
        """The modality pairs of the cross-modality KL loss (``cross_modality_kl_pairs``, None = all a < b)."""
        if self.cross_modality_kl_pairs is not None:
            return [tuple(p) for p in self.cross_modality_kl_pairs]
        M = self.num_modalities
        return [(a, b) for a in range(M) for b in range(a + 1, M)]

    def dropless_always(self) -> bool:
        """No capacity limit in training nor in eval."""
        return self.capacity_setting(True) is None and self.capacity_setting(False) is None

    def by_modality(self, name: str) -> tuple[float, ...]:
        """Per-modality values of ``local_entropy_weight``, ``global_entropy_weight`` or
        ``global_entropy_min_experts``: the ``*_by_modality`` tuple if set, else the scalar M times."""
        values = getattr(self, f"{name}_by_modality")
        return tuple(values) if values is not None else (float(getattr(self, name)),) * self.num_modalities

    def k(self, training: bool) -> int:
        return self.top_k if training or self.eval_top_k is None else self.eval_top_k

    def capacity_setting(self, training: bool) -> Optional[float]:
        """The capacity factor in force, or None for dropless."""
        if training:
            return None if self.dropless else self.capacity_factor
        dropless = self.dropless if self.eval_dropless is None else self.eval_dropless
        if dropless:
            return None
        return self.capacity_factor if self.eval_capacity_factor is None else self.eval_capacity_factor
