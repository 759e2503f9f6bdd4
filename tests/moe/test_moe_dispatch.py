"""Dispatchers (loop, sorted) against a naive per-token reference: outputs and gradients, in fp64.

The reference re-implements the expert MLP and the activations from their formulas (it does not call
``StackedExperts`` or ``apply_activation``) and loops over tokens and slots one by one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zoo.moe import MoEConfig, MoELayer, StackedExperts, loop_dispatch, sorted_dispatch

from . import np_ref

DISPATCHERS = {"loop": loop_dispatch, "sorted": sorted_dispatch}


def act_ref(h, activation):
    if activation == "gelu":
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    if activation == "gelu_tanh":
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    gate, up = h[..., : h.shape[-1] // 2], h[..., h.shape[-1] // 2:]
    return gate * torch.sigmoid(gate) * up


def naive_moe(x, idx, cw, keep, w1, b1, w2, b2, activation):
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for k in range(idx.shape[1]):
            if keep[t, k]:
                e = int(idx[t, k])
                h = x[t] @ w1[e] + (0 if b1 is None else b1[e])
                acc = acc + cw[t, k] * (act_ref(h, activation) @ w2[e] + (0 if b2 is None else b2[e]))
        rows.append(acc)
    return torch.stack(rows)


def make_case(T, D, H, E, K, activation, bias, seed, used_experts=None, p_keep=0.8):
    gen = torch.Generator().manual_seed(seed)
    experts = StackedExperts(E, D, H, activation, bias).double()
    with torch.no_grad():  # larger than the 0.02 init so that every term matters at fp64 tolerance
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64)
    pool = torch.tensor(used_experts if used_experts is not None else list(range(E)))
    # K distinct experts per token, drawn from the pool.
    idx = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:K]] for _ in range(T)])
    keep = torch.rand(T, K, generator=gen) < p_keep
    cw = torch.rand(T, K, generator=gen, dtype=torch.float64)
    return experts, x, idx, cw, keep


CASES = [  # T, D, H, E, K, activation, bias, used experts (None = all), keep probability
    (9, 4, 6, 3, 1, "gelu_tanh", True, None, 0.8),
    (17, 8, 5, 8, 2, "gelu_tanh", True, [1, 4, 6], 0.8),  # five experts get no token
    (12, 6, 7, 4, 2, "gelu", True, None, 0.7),
    (10, 5, 4, 8, 2, "swiglu", False, None, 0.9),
    (7, 3, 4, 2, 2, "swiglu", True, None, 1.0),
    (6, 4, 3, 5, 2, "gelu_tanh", True, None, 0.0),       # every slot masked / dropped
    (1, 4, 3, 8, 1, "gelu", False, None, 1.0),           # a single token
]


def grads(y, inputs, seed):
    R = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    if not y.requires_grad:  # nothing was dispatched: the output is a constant 0
        return [torch.zeros_like(i) for i in inputs]
    gs = torch.autograd.grad((y * R).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(gs, inputs)]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[5]}-E{c[3]}-K{c[4]}-{i}" for i, c in enumerate(CASES)])
def test_dispatch_matches_naive_reference_fp64(case):
    T, D, H, E, K, activation, bias, used, p_keep = case
    experts, x, idx, cw, keep = make_case(T, D, H, E, K, activation, bias, seed=T * 31 + E, used_experts=used,
                                          p_keep=p_keep)
    params = [p for p in (experts.w1, experts.b1, experts.w2, experts.b2) if p is not None]
    x.requires_grad_(True)
    cw.requires_grad_(True)
    inputs = [x, cw, *params]
    ref = naive_moe(x, idx, cw, keep, experts.w1, experts.b1, experts.w2, experts.b2, activation)
    ref_grads = grads(ref, inputs, seed=1)
    # A numpy forward pass as a second, autograd-free reference.
    npy = np_ref.moe_combine(x.detach().numpy(), idx.numpy(), cw.detach().numpy(), keep.numpy(),
                             *[None if t is None else t.detach().numpy()
                               for t in (experts.w1, experts.b1, experts.w2, experts.b2)], activation)
    np.testing.assert_allclose(ref.detach().numpy(), npy, rtol=1e-12, atol=1e-12)
    for name, fn in DISPATCHERS.items():
        y = fn(x, idx, cw, keep, experts)
        assert y.dtype == torch.float64 and y.shape == (T, D)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12, msg=f"{name} output")
        for i, (g, r) in enumerate(zip(grads(y, inputs, seed=1), ref_grads)):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=f"{name} grad of input {i}")
    if not keep.any():
        assert (ref == 0).all()


def test_dropped_slots_are_ignored_even_with_nonzero_weight():
    experts, x, idx, cw, keep = make_case(8, 4, 5, 4, 2, "gelu_tanh", True, seed=5, p_keep=0.5)
    assert (cw[~keep] > 0).all() and (~keep).any()
    ref = naive_moe(x, idx, cw, keep, experts.w1, experts.b1, experts.w2, experts.b2, "gelu_tanh")
    for fn in DISPATCHERS.values():
        torch.testing.assert_close(fn(x, idx, cw, keep, experts), ref, rtol=1e-12, atol=1e-12)


def test_sorted_dispatch_is_bitwise_deterministic():
    experts, x, idx, cw, keep = make_case(64, 16, 32, 8, 2, "gelu_tanh", True, seed=11)
    experts, x, cw = experts.float(), x.float().requires_grad_(True), cw.float().requires_grad_(True)
    runs = []
    for _ in range(3):
        y = sorted_dispatch(x, idx, cw, keep, experts)
        runs.append([y.detach(), *grads(y, [x, cw, experts.w1, experts.w2], seed=2)])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_fp32_dispatch_keeps_input_dtype_and_matches_fp64():
    experts, x, idx, cw, keep = make_case(20, 8, 8, 4, 2, "gelu_tanh", True, seed=3)
    ref = naive_moe(x, idx, cw, keep, experts.w1, experts.b1, experts.w2, experts.b2, "gelu_tanh")
    e32 = experts.float()
    for fn in DISPATCHERS.values():
        y = fn(x.float(), idx, cw.float(), keep, e32)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------- router gradients through the whole MoE layer
def reference_layer(x, Wr, experts, k, cap, activation):
    """Independent MoE layer (one group, token order, no BPR): softmax(x Wr^T), top-k, capacity, naive experts."""
    logits = x @ Wr.T
    probs = torch.softmax(logits, -1)
    _, _, keep, _ = np_ref.route_topk(probs.detach().numpy()[None], np.ones((1, x.shape[0]), bool), k, cap, bpr=False)
    idx = torch.topk(probs.detach(), k, -1).indices
    cw = torch.gather(probs, 1, idx)
    return naive_moe(x, idx, cw, torch.from_numpy(keep[0]), experts.w1, experts.b1, experts.w2, experts.b2,
                     activation)


@pytest.mark.parametrize("dispatch", ["loop", "sorted"])
@pytest.mark.parametrize("activation,k,cf", [("gelu_tanh", 2, None), ("swiglu", 1, 1.0), ("gelu", 2, 0.75)])
def test_layer_gradients_including_router(dispatch, activation, k, cf):
    E, D, H, S = 4, 6, 5, 12
    cfg = MoEConfig(num_experts=E, top_k=k, batch_priority=False, group_size=None, capacity_multiple_of=1,
                    dropless=cf is None, capacity_factor=cf or 1.0, activation=activation, dispatch=dispatch,
                    importance_loss_weight=0.0, load_loss_weight=0.0)
    torch.manual_seed(0)
    layer = MoELayer(D, H, cfg).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.7)
    x = torch.randn(1, S, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    params = [x, layer.router.proj.weight, *[p for p in layer.experts.parameters()]]
    got = grads(y, params, seed=4)
    cap = None if cf is None else np_ref.capacity(S, E, k, cf, 1)
    ref = reference_layer(x[0], layer.router.proj.weight, layer.experts, k, cap, activation)
    want = grads(ref.unsqueeze(0), params, seed=4)
    # Routing is computed in fp32 by design (stable top-k), so only fp32-level agreement is possible.
    torch.testing.assert_close(y, ref.unsqueeze(0), rtol=1e-5, atol=1e-6)
    for i, (g, r) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=f"grad {i}")
    assert got[1].abs().sum() > 0  # the router does receive a gradient through the combine weights
