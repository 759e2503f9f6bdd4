"""LoRA (zoo.layers.lora) and LoRA experts (zoo.moe.LoRAExperts, Uni-MoE): start as the base, merged == unmerged,
the merged stacked weights the fused path reads == the low-rank per-expert loop, gradients reach only the factors."""

import pytest
import torch
from torch import nn

from zoo.layers import LoRALinear, Mlp, apply_lora, merge_lora
from zoo.moe import LoRAExperts, MoEConfig, MoELayer, StackedExperts


def _trained(lora: nn.Module, seed: int = 0) -> None:
    """Give every LoRA factor random values, as training would (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_linear_starts_as_base_merges_exactly_and_trains_only_the_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    base = model(x).detach()
    assert apply_lora(model, ["0", "2"], r=2, alpha=4) == ["0", "2"]
    assert isinstance(model[0], LoRALinear) and model[0].scaling == 2.0
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B", "2.lora_A",
                                                                           "2.lora_B"}
    _trained(model)
    unmerged = model(x).detach()
    assert not torch.allclose(unmerged, base)
    assert merge_lora(model) == 2 and isinstance(model[0], nn.Linear) and not isinstance(model[0], LoRALinear)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not nn.Linear"):
        apply_lora(model, ["1"])


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True)])
def test_lora_experts_start_as_the_dense_ffn_and_merged_equals_low_rank_loop(activation, bias):
    torch.manual_seed(0)
    D, H, E = 16, 24, 4
    dense = Mlp(D, H, activation=activation, bias=bias)
    experts = LoRAExperts.from_dense(dense.fc1.weight, dense.fc1.bias, dense.fc2.weight, dense.fc2.bias, E,
                                     activation, r=2, alpha=4)
    x = torch.randn(7, D)
    for e in range(E):
        torch.testing.assert_close(experts.expert(e, x), dense(x), rtol=0, atol=1e-6)
    _trained(experts)
    sw = experts.stacked()  # what the fused kernel reads
    outs = [experts.expert(e, x) for e in range(E)]
    assert not torch.allclose(outs[0], outs[1])
    for e in range(E):
        torch.testing.assert_close(sw.expert(e, x), outs[e], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(experts.merged().expert(e, x), outs[e], rtol=1e-5, atol=1e-6)
    if activation == "swiglu":  # separate rank-r LoRA on gate and up: the gate delta never touches up columns
        delta = sw.w1 - experts.w1
        assert torch.linalg.matrix_rank(delta[0, :, :H]) <= 2 and torch.linalg.matrix_rank(delta[0, :, H:]) <= 2


def test_moe_layer_with_lora_experts_trains_only_lora_and_router_and_merges():
    torch.manual_seed(0)
    D, H, E = 16, 24, 4
    cfg = MoEConfig(num_experts=E, top_k=2, activation="swiglu", expert_bias=False, renormalize=True, dropless=True,
                    noise_std=0.0, group_size=1)
    dense = Mlp(D, H, activation="swiglu", bias=False)
    experts = LoRAExperts.from_dense(dense.fc1.weight, None, dense.fc2.weight, None, E, "swiglu", r=2, alpha=4)
    layer = MoELayer(D, H, cfg, experts=experts)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)  # identical experts, gates sum to 1
    _trained(layer.experts)
    layer(x).square().sum().backward()
    grads = {n for n, p in layer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"router.proj.weight", "experts.lora_a1", "experts.lora_b1", "experts.lora_a2", "experts.lora_b2"}
    layer.eval()
    with torch.no_grad():
        want = layer(x)
        layer.experts = layer.experts.merged()
        assert isinstance(layer.experts, StackedExperts)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True)])
def test_lora_experts_from_experts_keep_per_expert_bases_and_merge_exactly(activation, bias):
    """Uni-MoE v1 stage 3: every expert its own frozen base (different FFNs), per-expert deltas."""
    torch.manual_seed(0)
    D, H, E = 16, 24, 3
    stacked = StackedExperts(E, D, H, activation, bias=bias)
    with torch.no_grad():
        for p in stacked.parameters():
            p.normal_()
    lora = LoRAExperts.from_experts(stacked, r=2, alpha=4)
    assert lora.per_expert_base and lora.w1.shape == stacked.w1.shape and not lora.w1.requires_grad
    assert set(stacked.state_dict()) <= set(lora.state_dict())  # a stacked state dict loads into the bases
    x = torch.randn(7, D)
    for e in range(E):  # B = 0: each expert starts as ITS original
        torch.testing.assert_close(lora.expert(e, x), stacked.expert(e, x), rtol=0, atol=0)
    _trained(lora)
    sw, merged = lora.stacked(), lora.merged()
    for e in range(E):
        want = lora.expert(e, x)
        assert not torch.allclose(want, stacked.expert(e, x))
        torch.testing.assert_close(sw.expert(e, x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged.expert(e, x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.forward_dense(x.expand(E, -1, -1)), lora.forward_dense(x.expand(E, -1, -1)),
                               rtol=1e-5, atol=1e-5)
    lora.expert(1, x).sum().backward()
    assert lora.w1.grad is None and lora.lora_b2.grad[1].abs().sum() > 0 and lora.lora_b2.grad[0].abs().sum() == 0


def test_lora_spec_wraps_experts_and_a_group_starts_as_the_model_and_merges_back():
    import zoo
    from zoo.models.lora_spec import LoRASpec, lora_parameter_names, merge_all_lora

    torch.manual_seed(0)
    model = zoo.upcycle(zoo.create_model("decoder_tiny"), num_experts=2, top_k=1).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    want = model(ids).logits
    spec = LoRASpec.from_dict({"experts": True, "modules": ["attention"], "r": 2, "alpha": 4})
    done = spec.apply(model)
    assert done["experts"] and done["modules"] and all(isinstance(dict(model.named_modules())[n], LoRALinear)
                                                       for n in done["modules"])
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-6)
    _trained(model)
    trained = model(ids).logits
    assert merge_all_lora(model) == len(done["experts"]) + len(done["modules"]) and not lora_parameter_names(model)
    torch.testing.assert_close(model(ids).logits, trained, rtol=1e-4, atol=1e-5)
    for bad, msg in (({"rank": 2}, "unknown key"), ({"r": 2}, "nothing would get LoRA"),
                     ({"modules": ["no.such"]}, "not nn.Linear")):
        with pytest.raises(ValueError, match=msg):
            LoRASpec.from_dict(bad).apply(zoo.create_model("decoder_tiny"))
