"""The experts seam (``zoo.moe.experts.Experts``): the layer runs any experts through the reference dispatchers and
the fused path only where they expose stacked weights; shared experts (Qwen2-MoE) equal a hand-written block and
transformers' ``Qwen2MoeSparseMoeBlock``; the routing record for reports."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo.moe.layer as layer_mod
from zoo.moe import Experts, MoEConfig, MoELayer, StackedExperts, StackedWeights, reference_moe


class LowRankExperts(Experts):
    """A LoRA-style expert set as Uni-MoE uses it: one frozen shared FFN plus a low-rank delta per expert. Exposes its
    merged weights (``stacked``) only when ``merge`` is set, to test both sides of the seam."""

    def __init__(self, E: int, D: int, H: int, rank: int, merge: bool) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim, self.activation = E, D, H, "gelu_tanh"
        self.base1 = nn.Parameter(torch.randn(D, H) * 0.3, requires_grad=False)
        self.base2 = nn.Parameter(torch.randn(H, D) * 0.3, requires_grad=False)
        self.a1, self.b1_lr = nn.Parameter(torch.randn(E, D, rank) * 0.3), nn.Parameter(torch.randn(E, rank, H) * 0.3)
        self.a2, self.b2_lr = nn.Parameter(torch.randn(E, H, rank) * 0.3), nn.Parameter(torch.randn(E, rank, D) * 0.3)
        self.merge = merge

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.base1 + (x @ self.a1[e]) @ self.b1_lr[e]
        h = F.gelu(h, approximate="tanh")
        return h @ self.base2 + (h @ self.a2[e]) @ self.b2_lr[e]

    def stacked(self) -> Optional[StackedWeights]:
        return self.merged() if self.merge else None

    def merged(self) -> StackedWeights:
        return StackedWeights(self.base1 + self.a1 @ self.b1_lr, None, self.base2 + self.a2 @ self.b2_lr, None,
                              self.activation)


@pytest.mark.parametrize("dispatch", ["loop", "sorted", "auto"])
def test_custom_experts_run_through_the_dispatchers(dispatch):
    """LoRA-style experts plug into the layer: the same output as stacked experts holding the merged weights."""
    torch.manual_seed(0)
    E, D, H = 4, 12, 16
    cfg = MoEConfig(num_experts=E, top_k=2, dispatch=dispatch, expert_bias=False, group_size=None,
                    capacity_factor=1.0)
    lora = LowRankExperts(E, D, H, rank=2, merge=False)
    layer = MoELayer(D, H, cfg, experts=lora).eval()
    x = torch.randn(3, 7, D)
    y = layer(x)
    plain = MoELayer(D, H, cfg).eval()
    with torch.no_grad():
        plain.router.proj.weight.copy_(layer.router.proj.weight)
        plain.experts.w1.copy_(lora.merged().w1)
        plain.experts.w2.copy_(lora.merged().w2)
    torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-6)
    assert layer.experts is lora and isinstance(layer.experts, Experts)


def test_fused_path_only_for_experts_with_stacked_weights(monkeypatch):
    """With the fused kernel available (its plain-PyTorch reference standing in on CPU), the layer hands it the
    experts' stacked weights (merged LoRA weights included, with gradients to the low-rank factors); experts without
    stacked weights take the reference dispatcher."""
    calls = []  # activations the stand-in kernel ran with

    def kernel(*args):
        calls.append(args[-1])
        return reference_moe(*args)

    monkeypatch.setattr(layer_mod, "_fused_moe_or_none", lambda x, act: kernel)
    torch.manual_seed(0)
    E, D, H = 4, 12, 16
    cfg = MoEConfig(num_experts=E, top_k=2, expert_bias=False, group_size=None, capacity_factor=1.0)
    x = torch.randn(2, 5, D)
    merged = MoELayer(D, H, cfg, experts=LowRankExperts(E, D, H, rank=2, merge=True)).train()
    y = merged(x)
    assert calls == ["gelu_tanh"]
    (y.square().sum() + merged.aux.loss).backward()
    assert merged.experts.a1.grad is not None and merged.experts.a1.grad.abs().sum() > 0
    unmerged = MoELayer(D, H, cfg, experts=LowRankExperts(E, D, H, rank=2, merge=False)).train()
    unmerged.load_state_dict(merged.state_dict())
    unmerged.router.generator = torch.Generator().manual_seed(0)
    merged.router.generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(unmerged(x), merged(x), rtol=1e-5, atol=1e-6)
    assert calls == ["gelu_tanh"] * 2  # the unmerged layer did not run the kernel
    stacked = MoELayer(D, H, cfg).train()
    stacked(x)
    assert calls == ["gelu_tanh"] * 3


def test_experts_argument_is_checked():
    cfg = MoEConfig(num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="num_experts=3"):
        MoELayer(8, 16, cfg, experts=StackedExperts(3, 8, 16))
    with pytest.raises(ValueError, match="hidden_dim=12"):
        MoELayer(8, 16, cfg, experts=StackedExperts(4, 8, 12))
    with pytest.raises(TypeError, match="Experts"):
        MoELayer(8, 16, cfg, experts=nn.Linear(8, 8))


# ----------------------------------------------------------------------------------------------- shared experts
def _qwen2_moe_cfg(**kw) -> MoEConfig:
    """Qwen2-MoE routing: softmax over all experts, top-k, no renormalisation, dropless, SwiGLU without biases, one
    sigmoid-gated shared expert."""
    base = dict(num_experts=4, top_k=2, renormalize=False, noise_std=0.0, dropless=True, group_size=None,
                activation="swiglu", expert_bias=False, num_shared_experts=1, shared_expert_hidden_dim=24,
                shared_expert_gate=True, importance_loss_weight=0.0, load_loss_weight=0.0)
    return MoEConfig(**{**base, **kw})


def _random_layer(cfg: MoEConfig, D=16, H=8, seed=0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, H, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return layer.eval()


def qwen2_moe_block(x: torch.Tensor, layer: MoELayer, norm_topk_prob: bool) -> torch.Tensor:
    """Qwen2-MoE's sparse MoE block written out in plain torch from the layer's weights: router softmax over all
    experts, top-k (optionally renormalised), SwiGLU experts, plus sigmoid(gate(x)) * shared SwiGLU MLP."""
    B, S, D = x.shape
    h = x.reshape(-1, D)
    probs = torch.softmax(h @ layer.router.proj.weight.t(), dim=-1)
    weights, chosen = torch.topk(probs, layer.config.top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(h)
    e_ = layer.experts
    H = e_.hidden_dim
    for t in range(h.shape[0]):
        for j in range(chosen.shape[1]):
            e = int(chosen[t, j])
            gate, up = h[t] @ e_.w1[e][:, :H], h[t] @ e_.w1[e][:, H:]
            out[t] += weights[t, j] * ((F.silu(gate) * up) @ e_.w2[e])
    se = layer.shared_expert
    Hs = se.fc2.weight.shape[1]
    gate, up = h @ se.fc1.weight[:Hs].t(), h @ se.fc1.weight[Hs:].t()
    shared = (F.silu(gate) * up) @ se.fc2.weight.t()
    out = out + torch.sigmoid(h @ layer.shared_expert_gate.weight.t()) * shared
    return out.reshape(B, S, D)


@pytest.mark.parametrize("renormalize", [False, True])
def test_shared_expert_moe_equals_a_hand_written_qwen2_moe_block(renormalize):
    layer = _random_layer(_qwen2_moe_cfg(renormalize=renormalize))
    assert isinstance(layer.shared_expert_gate, nn.Linear) and layer.shared_expert_gate.bias is None
    assert tuple(layer.shared_expert.fc1.weight.shape) == (48, 16)  # [gate | up] of width 24 each
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), qwen2_moe_block(x, layer, renormalize), rtol=1e-5, atol=1e-5)


def test_shared_expert_width_and_masking():
    """Default width = routed width x num_shared_experts; no gate unless asked; masked tokens give 0 (as routed)."""
    layer = _random_layer(_qwen2_moe_cfg(num_shared_experts=2, shared_expert_hidden_dim=None,
                                         shared_expert_gate=False))
    assert layer.shared_expert_gate is None and layer.shared_expert.fc2.weight.shape == (16, 16)  # 2 x 8
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        y = layer(x, mask)
        assert torch.equal(y[1, 3:], torch.zeros(2, 16))
        torch.testing.assert_close(y[:, :3], layer(x[:, :3]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="num_shared_experts"):
        MoEConfig(shared_expert_gate=True)


def test_shared_expert_moe_equals_transformers_qwen2_moe_block():
    transformers = pytest.importorskip("transformers")
    qwen = pytest.importorskip("transformers.models.qwen2_moe.modeling_qwen2_moe")
    if not hasattr(qwen, "Qwen2MoeSparseMoeBlock"):
        pytest.skip("this transformers has no Qwen2MoeSparseMoeBlock")
    hf_cfg = transformers.Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=8, shared_expert_intermediate_size=24,
                                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                         hidden_act="silu")
    torch.manual_seed(0)
    block = qwen.Qwen2MoeSparseMoeBlock(hf_cfg).float().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    layer = MoELayer(16, 8, _qwen2_moe_cfg()).eval()
    sd = block.state_dict()
    with torch.no_grad():
        layer.router.proj.weight.copy_(sd["gate.weight"])
        if "experts.gate_up_proj" in sd:  # transformers >= 5: stacked [E, 2H, D] and [E, D, H]
            layer.experts.w1.copy_(sd["experts.gate_up_proj"].transpose(1, 2))
            layer.experts.w2.copy_(sd["experts.down_proj"].transpose(1, 2))
        else:  # one Qwen2MoeMLP per expert
            for e in range(4):
                layer.experts.w1[e].copy_(torch.cat([sd[f"experts.{e}.gate_proj.weight"],
                                                     sd[f"experts.{e}.up_proj.weight"]]).t())
                layer.experts.w2[e].copy_(sd[f"experts.{e}.down_proj.weight"].t())
        layer.shared_expert.fc1.weight.copy_(torch.cat([sd["shared_expert.gate_proj.weight"],
                                                        sd["shared_expert.up_proj.weight"]]))
        layer.shared_expert.fc2.weight.copy_(sd["shared_expert.down_proj.weight"])
        layer.shared_expert_gate.weight.copy_(sd["shared_expert_gate.weight"])
        x = torch.randn(3, 7, 16)
        want = block(x)
        want = want[0] if isinstance(want, tuple) else want
        assert (layer(x) - want).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------------- routing record
@pytest.mark.parametrize("router", ["topk", "expert_choice", "soft"])
def test_routing_record(router):
    """``record_routing``: detached probabilities, valid mask, modality, expert index and keep in the caller's batch
    layout (the padding sequences of a partial group removed), consistent with the statistics; off by default."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, router=router, group_size=2, capacity_factor=1.0, num_modalities=2)
    layer = MoELayer(8, 12, cfg).train()
    x = torch.randn(3, 5, 8, requires_grad=True)  # 3 sequences in groups of 2: one padding sequence
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    modality = torch.tensor([0, 0, 1, 1, 1]).expand(3, 5)
    layer(x, mask, modality)
    assert layer.last_routing is None
    layer.record_routing = True
    layer(x, mask, modality)
    rec = layer.last_routing
    assert rec.probs.shape == (3, 5, 4) and rec.probs.dtype == torch.float32 and not rec.probs.requires_grad
    torch.testing.assert_close(rec.probs.sum(-1), torch.ones(3, 5))
    assert torch.equal(rec.valid, mask) and torch.equal(rec.modality, modality)
    assert torch.equal(rec.probs.argmax(-1).masked_fill(~mask, -1), layer.aux.stats.top1_expert)
    if router == "soft":
        assert rec.expert_index is None and rec.keep is None
        return
    K = 2 if router == "topk" else 4
    assert rec.expert_index.shape == rec.keep.shape == (3, 5, K)
    assert not rec.keep[~mask].any()
    kept = torch.zeros(4)
    kept.index_add_(0, rec.expert_index[rec.keep], torch.ones(int(rec.keep.sum())))
    torch.testing.assert_close(kept, layer.aux.stats.tokens_per_expert)
