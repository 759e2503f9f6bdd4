"""Causal routing (``MoELayer(..., causal=True)``): no later token changes an earlier token's routing or output, and
a sequence's routing and output do not depend on the other sequences of the batch, for every router and capacity
setting a causal layer accepts; the settings that would leak are refused.

Routing decisions (expert index, keep) are compared bit for bit. Outputs are compared to 1e-6: on CPU, MKL's sgemm
gives a row different low bits depending on how many rows the GEMM has (M below 12 and not a multiple of 4, measured
with MKL 2024.2 / AVX2), and the rows an expert gets change with the other tokens' routing in any sparse dispatch.
A real leak moves outputs by ~0.1-0.5 (``test_a_non_causal_layer_does_leak``).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import zoo.moe.layer as layer_mod
from zoo.moe import MoEConfig, MoELayer, reference_moe

D, H, E = 8, 12, 4
CAPACITY = {"cf0.5": dict(capacity_factor=0.5), "cf1.0": dict(capacity_factor=1.0),
            "cf1.5": dict(capacity_factor=1.5), "dropless": dict(dropless=True)}
SETTINGS = {f"k{k}-renorm{int(r)}-bpr{int(b)}-{c}": dict(top_k=k, renormalize=r, batch_priority=b, **CAPACITY[c])
            for k, r, b, c in itertools.product((1, 2), (False, True), (False, True), CAPACITY)}


def make_layer(causal: bool = True, **kw) -> MoELayer:
    cfg = dict(num_experts=E, capacity_multiple_of=1, group_size=8, z_loss_weight=1e-3, **kw)
    torch.manual_seed(0)
    layer = MoELayer(D, H, MoEConfig(**cfg), causal=causal)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * (2.0 if "router" in name else 0.4))
    return layer


def run(layer: MoELayer, x: torch.Tensor, mask=None, seed: int = 0):
    """(output [B, S, D], routing record) of one forward with reproducible router noise."""
    layer.router.generator = torch.Generator().manual_seed(seed)  # the same noise for inputs of the same shape
    layer.record_routing = True
    with torch.no_grad():
        return layer(x, mask), layer.last_routing


def assert_same(a, b, idx, what: str, idx_b=None) -> None:
    """Same routing decisions bit for bit, same outputs to 1e-6, at ``idx`` of two ``run`` results (``idx_b`` in
    the second, if different)."""
    (ya, ra), (yb, rb) = a, b
    ib = idx if idx_b is None else idx_b
    assert torch.equal(ra.expert_index[idx], rb.expert_index[ib]), f"{what}: expert choice changed"
    assert torch.equal(ra.keep[idx], rb.keep[ib]), f"{what}: kept slots changed"
    torch.testing.assert_close(ya[idx], yb[ib], rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_future_tokens_do_not_change_past_outputs(name, mode):
    layer = make_layer(**SETTINGS[name]).train(mode == "train")
    g = torch.Generator().manual_seed(1)
    B, S, t = 3, 12, 5
    x = torch.randn(B, S, D, generator=g)
    ref = run(layer, x)
    if name.endswith("cf0.5"):
        assert layer.aux.stats.dropped_fraction > 0  # capacity bites: the test covers dropping
    for change in (slice(t, S), slice(S - 1, S), slice(1, S)):
        x2 = x.clone()
        x2[1, change] = torch.randn(x2[1, change].shape, generator=g) * 3
        got = run(layer, x2)
        assert_same(ref, got, (1, slice(0, change.start)), f"positions < {change.start}")
        assert_same(ref, got, [0, 2], "another sequence")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_sequence_output_does_not_depend_on_the_batch(name, mode):
    """Batch vs alone (no router noise in training: a different batch draws different noise anyway)."""
    layer = make_layer(noise_std=0.0, **SETTINGS[name]).train(mode == "train")
    x = torch.randn(5, 9, D, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[3, :4] = False  # a left-padded sequence
    ref = run(layer, x, mask)
    for b in range(5):
        assert_same(ref, run(layer, x[b:b + 1], mask[b:b + 1]), slice(b, b + 1), f"sequence {b}", slice(0, 1))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["k2-renorm1-bpr1-cf0.5", "k1-renorm0-bpr0-cf1.0", "k2-renorm0-bpr1-dropless"])
def test_decode_step_routes_each_sequence_on_its_own(name, mode):
    """One new token per sequence (S=1): each row equals the same token decoded alone."""
    layer = make_layer(noise_std=0.0, **SETTINGS[name]).train(mode == "train")
    x = torch.randn(6, 1, D, generator=torch.Generator().manual_seed(3))
    ref = run(layer, x)
    for b in range(6):
        assert_same(ref, run(layer, x[b:b + 1]), slice(b, b + 1), f"sequence {b}", slice(0, 1))


def test_dropless_decode_equals_the_full_forward():
    """Dropless routing of a token depends on that token only: decoding position t alone gives the full forward's
    output at t (what a KV-cache decoder needs)."""
    layer = make_layer(**SETTINGS["k2-renorm1-bpr0-dropless"]).eval()
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(4))
    y = run(layer, x)[0]
    steps = torch.cat([run(layer, x[:, t:t + 1])[0] for t in range(7)], dim=1)
    torch.testing.assert_close(steps, y, rtol=1e-6, atol=1e-6)


def test_a_non_causal_layer_does_leak():
    """The property is not vacuous: without ``causal`` (groups of sequences, k-major capacity, batch priority) the
    same change of future tokens moves earlier outputs."""
    layer = make_layer(causal=False, **SETTINGS["k2-renorm0-bpr1-cf0.5"]).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 12, D, generator=g)
    x2 = x.clone()
    x2[1, 5:] = torch.randn(7, D, generator=g) * 3
    y, y2 = run(layer, x)[0], run(layer, x2)[0]
    assert (y[:, :5] - y2[:, :5]).abs().max() > 1e-2


def test_causal_on_the_fused_path(monkeypatch):
    """The fused GPU path gets the causal router's keep (the kernel sorts kept slots by expert, stably in slot order,
    and decides nothing itself): with the kernel's reference standing in on CPU, causal outputs hold there too."""
    calls = []  # activations the stand-in kernel ran with

    def kernel(*args):
        calls.append(args[-1])
        return reference_moe(*args)

    monkeypatch.setattr(layer_mod, "_fused_moe_or_none", lambda x, act: kernel)
    layer = make_layer(activation="gelu_tanh", **SETTINGS["k2-renorm0-bpr1-cf0.5"]).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 12, D, generator=g)
    x2 = x.clone()
    x2[1, 5:] = torch.randn(7, D, generator=g) * 3
    ref, got = run(layer, x), run(layer, x2)
    assert calls == ["gelu_tanh"] * 2
    assert_same(ref, got, (1, slice(0, 5)), "positions < 5")
    assert_same(ref, got, [0, 2], "another sequence")


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_non_causal_routers_are_refused(router):
    with pytest.raises(ValueError, match=f"router='{router}' is not causal"):
        MoELayer(D, H, MoEConfig(num_experts=E, router=router), causal=True)


def test_capacity_from_valid_tokens_is_refused():
    with pytest.raises(ValueError, match="capacity_from_valid_tokens"):
        MoELayer(D, H, MoEConfig(num_experts=E, capacity_from_valid_tokens=True), causal=True)
    MoELayer(D, H, MoEConfig(num_experts=E, capacity_from_valid_tokens=True, dropless=True), causal=True)
