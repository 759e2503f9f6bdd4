"""``MoEConfig.deepspeed_top2_gating`` (issue 19): DeepSpeed 0.9.5's top-2 gating as MoE-LLaVA ran it, against the
in-house DeepSpeed peer ``benchmarks/moe_peers.py:DeepSpeedTop2MoE`` fed the same Gumbel draws; eval randomness from
the router's generator; the causal refusal; the config checks; a MoE-LLaVA preset turning it on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from zoo.moe import MoEConfig, MoELayer
from zoo.moe.routing import deepspeed_capacity, gumbel_uniform

ROOT = Path(__file__).resolve().parents[2]
D, H, E = 8, 12, 4


def _peers():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import moe_peers

    return moe_peers


def ds_config(mode="gumbel", **kw):
    cfg = dict(num_experts=E, top_k=2, renormalize=True, noise_std=0.0, batch_priority=False, group_size=None,
               capacity_multiple_of=1, capacity_factor=0.5, eval_capacity_factor=0.75, min_capacity=2,
               importance_loss_weight=0.0, load_loss_weight=0.0, deepspeed_top2_gating=mode, activation="swiglu",
               expert_bias=False)
    cfg.update(kw)
    return MoEConfig(**cfg)


def make_layer(mode="gumbel", seed=0, router_scale=1.0, causal=False, **kw):
    torch.manual_seed(seed)
    layer = MoELayer(D, H, ds_config(mode, **kw), causal=causal)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * (router_scale if "router" in name else 0.4))
    return layer


def peer_forward(layer, x, cf, min_capacity, uniform=None, monkeypatch=None):
    """The DeepSpeed peer on ``x`` with the layer's weights; its Gumbel draws ``-log(-log(u))`` use ``uniform``."""
    peer = _peers().DeepSpeedTop2MoE(layer, capacity_factor=cf, min_capacity=min_capacity,
                                     second_expert_noise=uniform is not None)
    if uniform is not None:
        monkeypatch.setattr(torch, "rand_like", lambda t: uniform.reshape(t.shape).clone())
    y = peer(x)
    if uniform is not None:
        monkeypatch.undo()
    return y, peer


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", ["gumbel", "argmax"])
def test_matches_deepspeed_peer_with_the_same_gumbel_draws(mode, training, monkeypatch):
    """Outputs and gradients equal the peer's (1e-5) with tokens dropped: the layer's Gumbel noise is drawn from a
    seeded router generator, the peer's ``torch.rand_like`` returns the same uniform draws."""
    B, S = 3, 8
    layer = make_layer(mode, router_scale=0.5, switch_loss_weight=0.01).train(training)
    x = torch.randn(B, S, D)
    seed = 7
    layer.router.generator = torch.Generator().manual_seed(seed)
    xz = x.clone().requires_grad_(True)
    y = layer(xz)
    (y * torch.linspace(-1, 1, D)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    assert layer.aux.stats.dropped_fraction > 0.05  # the capacity rule is exercised
    cf = 0.5 if training else 0.75
    assert layer.aux.stats.capacity == deepspeed_capacity(B * S, E, cf, 2) == (6 if training else 9)
    uniform = None
    if mode == "gumbel":  # the same draws as the layer: one group of B*S tokens
        uniform = gumbel_uniform((1, B * S, E), torch.device("cpu"), torch.Generator().manual_seed(seed))
    layer.zero_grad(set_to_none=True)
    xp = x.clone().requires_grad_(True)
    want, peer = peer_forward(layer, xp, cf, 2, uniform, monkeypatch)
    # the zoo's Switch / GShard loss on the whole-call group is DeepSpeed's l_aux
    assert abs(layer.aux.losses["switch_loss"] - peer.l_aux.detach()) <= 1e-6
    (want * torch.linspace(-1, 1, D)).sum().backward()
    assert (y - want).abs().max() <= 1e-5
    assert (xz.grad - xp.grad).abs().max() <= 1e-5
    for name, p in layer.named_parameters():
        assert (grads[name] - p.grad).abs().max() <= 1e-5, name
    assert grads["router.proj.weight"].abs().sum() > 0  # the renormalised gates carry the router's gradient


def test_gumbel_changes_second_choices_and_the_peer_sees_it(monkeypatch):
    """The noise matters (a test that passes without it proves nothing): with noise the second experts differ from
    the noiseless choice, and the peer fed OTHER draws disagrees with the layer."""
    layer = make_layer("gumbel", router_scale=0.3, dropless=True, eval_dropless=True).eval()
    x = torch.randn(2, 16, D)
    layer.router.generator = torch.Generator().manual_seed(3)
    layer.record_routing = True
    with torch.no_grad():
        y = layer(x)
    noisy_second = layer.last_routing.expert_index[..., 1].clone()
    plain = make_layer("argmax", router_scale=0.3, dropless=True, eval_dropless=True).eval()
    plain.record_routing = True
    with torch.no_grad():
        plain(x)
    assert (noisy_second != plain.last_routing.expert_index[..., 1]).any()
    assert torch.equal(layer.last_routing.expert_index[..., 0], plain.last_routing.expert_index[..., 0])
    other = gumbel_uniform((1, 32, E), torch.device("cpu"), torch.Generator().manual_seed(4))
    with torch.no_grad():
        wrong, _ = peer_forward(layer, x, 100.0, 0, other, monkeypatch)
    assert (y - wrong).abs().max() > 1e-3


def test_eval_is_random_across_generator_states_and_reproducible_for_a_seed():
    layer = make_layer("gumbel", router_scale=0.3).eval()
    x = torch.randn(2, 16, D)

    def run(generator):
        layer.router.generator = generator
        with torch.no_grad():
            return layer(x)

    a = run(torch.Generator().manual_seed(1))
    assert torch.equal(a, run(torch.Generator().manual_seed(1)))
    assert (a - run(torch.Generator().manual_seed(2))).abs().max() > 1e-3
    g = torch.Generator().manual_seed(1)
    assert not torch.equal(run(g), run(g))  # the generator advances: each eval call draws anew
    # Without a router generator the global RNG draws: torch.manual_seed makes a run reproducible.
    torch.manual_seed(5)
    b = run(None)
    torch.manual_seed(5)
    assert torch.equal(b, run(None))
    # "argmax" is deterministic whatever the generator.
    plain = make_layer("argmax", router_scale=0.3).eval()
    with torch.no_grad():
        assert torch.equal(plain(x), plain(x))


def test_kept_gates_are_renormalised_after_dropping_and_masked_tokens_take_no_slot():
    layer = make_layer("argmax", router_scale=2.0, capacity_factor=0.25, min_capacity=0).train()
    layer.record_routing = True
    x = torch.randn(2, 8, D)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        layer(x, mask=mask)
    r = layer.last_routing
    routing = layer.router.plan(x.reshape(1, 16, D), mask.reshape(1, 16), 2, 0.25).run()
    cw, keep = routing.combine_weight[0], routing.keep[0]
    assert torch.equal(keep, r.keep.reshape(16, 2))
    assert routing.capacity == 2  # ceil(16 / 4 * 0.5) over all tokens of the call, padding included
    assert not keep[~mask.reshape(-1)].any() and (cw[~mask.reshape(-1)] == 0).all()
    one = keep.sum(-1) == 1
    assert one.any() and torch.allclose(cw[one].sum(-1), torch.ones(int(one.sum())))  # one kept slot: weight 1
    both = keep.all(-1)
    gates = routing.probs[0].gather(-1, routing.expert_index[0])
    torch.testing.assert_close(cw[both], gates[both] / gates[both].sum(-1, keepdim=True))
    # every expert's buffer: first choices (token order) before second choices, C slots at most
    for e in range(E):
        firsts = (routing.expert_index[0, :, 0] == e) & mask.reshape(-1)
        seconds = (routing.expert_index[0, :, 1] == e) & mask.reshape(-1)
        order = torch.cat([torch.nonzero(firsts)[:, 0] * 2, torch.nonzero(seconds)[:, 0] * 2 + 1])
        kept = keep.reshape(-1)[order]
        assert torch.equal(kept, torch.arange(len(order)) < 2), e


def test_capacity_rule():
    # float32 as DeepSpeed (torch.ceil(T / E * torch.tensor(2 * cf))); float64 would give 8 and 15
    assert deepspeed_capacity(10, 3, 1.05) == 7 and deepspeed_capacity(25, 4, 1.2) == 16
    assert deepspeed_capacity(10, 4, 0.1) == 1 and deepspeed_capacity(10, 4, 0.1, min_capacity=4) == 4
    assert deepspeed_capacity(24, 4, 1.5) == 18
    with pytest.raises(ValueError):
        deepspeed_capacity(0, 4, 1.0)


def test_causal_layer_refuses_it_with_a_capacity_and_takes_it_dropless():
    with pytest.raises(ValueError, match="not causal"):
        make_layer("gumbel", causal=True)
    with pytest.raises(ValueError, match="not causal"):  # dropless in training only: eval still has capacity
        make_layer("gumbel", causal=True, dropless=True, eval_dropless=False)
    layer = make_layer("gumbel", causal=True, dropless=True, eval_dropless=True, router_scale=0.5).eval()
    x = torch.randn(1, 10, D)
    layer.router.generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        full = layer(x)
    layer.router.generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the same draws for the first tokens: a prefix routes and computes the same
        prefix = layer(x[:, :6])
    assert (full[:, :6] - prefix).abs().max() <= 1e-6
    # The router itself refuses a causal plan with a capacity.
    with pytest.raises(ValueError, match="not causal"):
        layer.router.plan(x, torch.ones(1, 10, dtype=torch.bool), 2, 1.0, causal=True)


def test_config_names_every_contradicting_setting():
    with pytest.raises(ValueError) as err:
        MoEConfig(deepspeed_top2_gating="gumbel")  # V-MoE defaults
    msg = str(err.value)
    for name in ("noise_std", "renormalize", "batch_priority", "group_size", "capacity_multiple_of"):
        assert name in msg, name
    with pytest.raises(ValueError, match="top_k"):
        ds_config(top_k=1)
    with pytest.raises(ValueError, match="eval_top_k"):
        ds_config(eval_top_k=1)
    with pytest.raises(ValueError, match="router"):
        ds_config(router="expert_choice")
    with pytest.raises(ValueError, match="deepspeed_top2_gating"):
        ds_config(mode="sampled")
    with pytest.raises(ValueError, match="min_capacity"):
        ds_config(min_capacity=-1)
    # dropless in training and eval: grouping and rounding play no part, so they are not refused
    ds_config(group_size=8, capacity_multiple_of=4, dropless=True, eval_dropless=True)
    assert MoEConfig().deepspeed_top2_gating == "off" and MoEConfig().min_capacity == 0


def test_min_capacity_applies_to_the_default_router_too():
    layer = MoELayer(D, H, MoEConfig(num_experts=E, capacity_factor=0.1, capacity_multiple_of=1, min_capacity=3))
    routing = layer.router.plan(torch.randn(1, 8, D), torch.ones(1, 8, dtype=torch.bool), 2, 0.1).run()
    assert routing.capacity == 3


def test_moe_llava_preset_can_turn_it_on():
    """A MoE-LLaVA config sets it under ``decoder.moe``; the causal decoder takes it dropless and refuses it with
    the presets' capacity, naming the reason."""
    from zoo.config import ConfigError
    from zoo.registry import build_model, model_config

    on = {"decoder.moe.deepspeed_top2_gating": "gumbel"}
    with pytest.raises((ConfigError, ValueError), match="group_size|not causal"):
        build_model("moe_llava", model_config("moe_llava_tiny", **on))
    with pytest.raises(ValueError, match="not causal"):
        build_model("moe_llava", model_config("moe_llava_tiny", **on, **{"decoder.moe.group_size": None}))
    cfg = model_config("moe_llava_tiny", **on, **{"decoder.moe.dropless": True, "decoder.moe.eval_dropless": True})
    assert cfg.decoder.moe.deepspeed_top2_gating == "gumbel"
    torch.manual_seed(0)
    model = build_model("moe_llava", cfg).eval()
    ids = torch.randint(0, 500, (1, 12))
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(ids).logits
        torch.manual_seed(1)
        b = model(ids).logits
        torch.manual_seed(2)
        c = model(ids).logits
    assert torch.equal(a, b) and not torch.equal(a, c)
