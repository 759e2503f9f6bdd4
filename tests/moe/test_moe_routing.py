"""Routers against hand-worked examples and an independent numpy reference (tests/moe/np_ref.py).

Router logits are set by hand: with ``D = E`` and ``router.proj.weight = I`` the logits ARE the tokens.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zoo.moe import ExpertChoiceRouter, SoftRouter, TopKRouter

from . import np_ref


def topk_router(E, *, bpr=True, renormalize=False, noise_std=1.0, multiple_of=1):
    r = TopKRouter(E, E, noise_std=noise_std, renormalize=renormalize, batch_priority=bpr,
                   capacity_multiple_of=multiple_of)
    with torch.no_grad():
        r.proj.weight.copy_(torch.eye(E))
    return r.eval().requires_grad_(False)


def logit(p):
    return math.log(p / (1 - p))


# Two experts: softmax([l, 0]) gives p(expert 0) = sigmoid(l). Top-1 probabilities 0.6, 0.9 (expert 1),
# 0.8, 0.7; S = 4, k = 2, cf = 0.5, no rounding: C = ceil(4 * 2 * 0.5 / 2) = 2.
HAND_P0 = [0.6, 0.1, 0.8, 0.7]
HAND_X = torch.tensor([[[logit(p), 0.0] for p in HAND_P0]])


def test_batch_priority_hand_example():
    r = topk_router(2, bpr=True)
    out = r(HAND_X, torch.ones(1, 4, dtype=torch.bool), top_k=2, capacity_factor=0.5)
    assert out.capacity == 2
    # BPR order t1 (0.9), t2 (0.8), t3 (0.7), t0 (0.6). Top-1 pass: t1->e1@0, t2->e0@0, t3->e0@1,
    # t0->e0@2 (dropped). Top-2 pass: t1->e0@3 (dropped), t2->e1@1, t3->e1@2 (dropped), t0->e1@3 (dropped).
    assert out.expert_index[0].tolist() == [[0, 1], [1, 0], [0, 1], [0, 1]]
    assert out.keep[0].tolist() == [[False, False], [True, False], [True, True], [True, False]]
    assert out.position[0].tolist() == [[-1, -1], [0, -1], [0, 1], [1, -1]]
    expected_w = [[0.0, 0.0], [0.9, 0.0], [0.8, 0.2], [0.7, 0.0]]
    np.testing.assert_allclose(out.combine_weight[0].numpy(), expected_w, atol=1e-6)


def test_token_order_hand_example():
    r = topk_router(2, bpr=False)
    out = r(HAND_X, torch.ones(1, 4, dtype=torch.bool), top_k=2, capacity_factor=0.5)
    # Token order. Top-1 pass: t0->e0@0, t1->e1@0, t2->e0@1, t3->e0@2 (dropped).
    # Top-2 pass: t0->e1@1, t1->e0@3 (dropped), t2->e1@2 (dropped), t3->e1@3 (dropped).
    assert out.keep[0].tolist() == [[True, True], [True, False], [True, False], [False, False]]
    assert out.position[0].tolist() == [[0, 1], [0, -1], [1, -1], [-1, -1]]
    np.testing.assert_allclose(out.combine_weight[0].numpy(), [[0.6, 0.4], [0.9, 0.0], [0.8, 0.0], [0.0, 0.0]],
                               atol=1e-6)


def test_masked_token_takes_no_capacity():
    # t0 has the highest top-1 probability (0.95 for expert 0) but is masked; C = 1 (S=4, k=1, cf=0.5, E=2).
    x = torch.tensor([[[logit(0.95), 0.0], [logit(0.7), 0.0], [logit(0.6), 0.0], [logit(0.2), 0.0]]])
    valid = torch.tensor([[False, True, True, True]])
    for bpr in (True, False):
        out = topk_router(2, bpr=bpr)(x, valid, top_k=1, capacity_factor=0.5)
        assert out.capacity == 1
        assert out.keep[0, :, 0].tolist() == [False, True, False, True]  # t1 gets expert 0's only slot
        assert out.position[0, :, 0].tolist() == [-1, 0, -1, 0]
        assert out.combine_weight[0, 0].item() == 0.0


RANDOM_CASES = [  # G, S, E, k, cf, bpr, renormalize, mask probability
    (1, 12, 4, 2, 1.0, True, False, 0.0),
    (3, 16, 4, 2, 0.75, True, False, 0.25),
    (2, 16, 8, 2, 1.05, True, False, 0.1),
    (2, 20, 8, 1, 1.5, True, False, 0.3),
    (2, 16, 4, 2, 0.75, False, False, 0.25),
    (1, 24, 6, 3, 0.5, False, False, 0.0),
    (2, 16, 4, 2, 1.0, False, True, 0.2),
    (2, 10, 3, 2, None, True, False, 0.3),  # dropless
    (1, 9, 8, 8, 0.5, True, False, 0.0),   # k = E
]


@pytest.mark.parametrize("G,S,E,k,cf,bpr,renorm,pmask", RANDOM_CASES)
def test_topk_matches_numpy_reference(G, S, E, k, cf, bpr, renorm, pmask):
    gen = torch.Generator().manual_seed(G * 1000 + S * 10 + E + k)
    x = torch.randn(G, S, E, generator=gen) * 2.0
    valid = torch.rand(G, S, generator=gen) >= pmask
    out = topk_router(E, bpr=bpr, renormalize=renorm)(x, valid, top_k=k, capacity_factor=cf)
    probs = np_ref.softmax(x.double().numpy())
    cap = None if cf is None else np_ref.capacity(S, E, k, cf, 1)
    idx, cw, keep, pos = np_ref.route_topk(probs, valid.numpy(), k, cap, bpr=bpr, renormalize=renorm)
    assert out.capacity == cap
    assert out.keep.numpy().tolist() == keep.tolist()
    assert out.position.numpy().tolist() == pos.tolist()
    # Where a slot is kept its expert must match (dropped slots' experts are unobservable downstream).
    np.testing.assert_array_equal(np.where(keep, out.expert_index.numpy(), -1), np.where(keep, idx, -1))
    np.testing.assert_allclose(out.combine_weight.numpy(), cw, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(out.clean_probs.numpy(), probs, atol=1e-6)
    # Capacity is respected: no expert holds more than C slots in a group, and positions are 0..n-1.
    for g in range(G):
        for e in range(E):
            p = sorted(out.position[g][out.keep[g] & (out.expert_index[g] == e)].tolist())
            assert p == list(range(len(p)))
            assert cap is None or len(p) <= cap
    assert not out.keep[~valid].any() and (out.position[~valid] == -1).all()
    # The demand counts each expert's valid slots per group; the first C of them are the kept ones.
    chose = out.expert_index.unsqueeze(-1) == torch.arange(E)  # [G, S, k, E]
    demand = (chose & valid[..., None, None]).sum((1, 2))
    assert torch.equal(out.expert_demand, demand)
    kept = (chose & out.keep.unsqueeze(-1)).sum((1, 2))
    assert torch.equal(kept, demand if cap is None else demand.clamp_max(cap))


def test_combine_weights_are_raw_softmax_probabilities():
    # One token, logits [2, 1, 0, -1]: top-2 weights are the softmax over ALL four experts, not renormalised.
    x = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    z = sum(math.exp(v) for v in (2, 1, 0, -1))
    out = topk_router(4)(x, torch.ones(1, 1, dtype=torch.bool), top_k=2, capacity_factor=None)
    np.testing.assert_allclose(out.combine_weight[0, 0].numpy(), [math.e**2 / z, math.e / z], rtol=1e-6)
    assert out.combine_weight.sum().item() < 0.9
    out = topk_router(4, renormalize=True)(x, torch.ones(1, 1, dtype=torch.bool), top_k=2, capacity_factor=None)
    np.testing.assert_allclose(out.combine_weight[0, 0].numpy(), [math.e / (math.e + 1), 1 / (math.e + 1)],
                               rtol=1e-6)


def test_renormalized_weights_sum_to_one():
    x = torch.randn(2, 32, 8, generator=torch.Generator().manual_seed(3))
    valid = torch.ones(2, 32, dtype=torch.bool)
    for k in (1, 2, 3):
        out = topk_router(8, renormalize=True)(x, valid, top_k=k, capacity_factor=None)
        np.testing.assert_allclose(out.combine_weight.sum(-1).numpy(), 1.0, atol=1e-6)
        plain = topk_router(8, renormalize=False)(x, valid, top_k=k, capacity_factor=None)
        if k < 8:
            assert (plain.combine_weight.sum(-1) < 1 - 1e-4).all()


# ------------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize("noise_std,E", [(1.0, 8), (2.0, 4), (1.0, 32)])
def test_training_noise_std_is_noise_std_over_num_experts(noise_std, E):
    r = topk_router(E, noise_std=noise_std).train()
    r.generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1024, E)
    out = r(x, torch.ones(4, 1024, dtype=torch.bool), top_k=2, capacity_factor=None)
    diff = (out.noisy_logits - out.logits).double()
    expected = noise_std / E
    assert out.noise_std == pytest.approx(expected)
    # ~32k samples: the std estimate is within ~0.4% (1 sigma); 3% is many sigmas and still tells 1/E from 1.
    assert diff.std().item() == pytest.approx(expected, rel=0.03)
    assert abs(diff.mean().item()) < 4 * expected / math.sqrt(diff.numel())
    np.testing.assert_allclose(out.logits.numpy(), x.numpy(), atol=1e-6)  # clean logits are x W (W = I)
    # Decisions use the NOISY probabilities.
    noisy_probs = np_ref.softmax(out.noisy_logits.double().numpy())
    np.testing.assert_allclose(out.probs.numpy(), noisy_probs, atol=1e-6)
    top = np.argsort(-noisy_probs, axis=-1)[..., :2]
    np.testing.assert_array_equal(out.expert_index.numpy(), top)
    # The same generator seed reproduces the same noise bit for bit; another seed does not.
    r.generator = torch.Generator().manual_seed(0)
    again = r(x, torch.ones(4, 1024, dtype=torch.bool), top_k=2, capacity_factor=None)
    assert torch.equal(again.noisy_logits, out.noisy_logits)
    r.generator = torch.Generator().manual_seed(1)
    other = r(x, torch.ones(4, 1024, dtype=torch.bool), top_k=2, capacity_factor=None)
    assert not torch.equal(other.noisy_logits, out.noisy_logits)


def test_eval_adds_no_noise_and_is_deterministic():
    r = topk_router(8)
    x = torch.randn(2, 64, 8)
    valid = torch.ones(2, 64, dtype=torch.bool)
    a = r(x, valid, top_k=2, capacity_factor=1.0)
    b = r(x, valid, top_k=2, capacity_factor=1.0)
    assert a.noise_std == 0.0
    assert torch.equal(a.noisy_logits, a.logits) and torch.equal(a.probs, a.clean_probs)
    for name in ("expert_index", "combine_weight", "keep", "position", "probs"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ----------------------------------------------------------------------------------- expert choice
def ec_router(E, multiple_of=1):
    r = ExpertChoiceRouter(E, E, noise_std=1.0, capacity_multiple_of=multiple_of)
    with torch.no_grad():
        r.proj.weight.copy_(torch.eye(E))
    return r.eval().requires_grad_(False)


@pytest.mark.parametrize("G,S,E,cf,pmask", [(2, 16, 4, 1.0, 0.0), (2, 16, 4, 2.0, 0.25), (1, 12, 3, 1.0, 0.5)])
def test_expert_choice_matches_reference(G, S, E, cf, pmask):
    gen = torch.Generator().manual_seed(S + E)
    x = torch.randn(G, S, E, generator=gen) * 2
    valid = torch.rand(G, S, generator=gen) >= pmask
    out = ec_router(E)(x, valid, top_k=1, capacity_factor=cf)
    C = np_ref.capacity(S, E, 1, cf, 1)
    assert out.capacity == C
    probs = np_ref.softmax(x.double().numpy())
    keep, cw = np_ref.route_expert_choice(probs, valid.numpy(), C)
    assert out.keep.numpy().tolist() == keep.tolist()
    np.testing.assert_allclose(out.combine_weight.numpy(), cw, atol=1e-6)
    taken = out.keep.sum(dim=1)  # [G, E]
    n_valid = valid.sum(1, keepdim=True)
    assert torch.equal(taken, torch.minimum(n_valid, torch.tensor(C)).expand(G, E))
    assert not out.keep[~valid].any()
    # Positions are 0..C-1 in descending probability order.
    for g in range(G):
        for e in range(E):
            toks = torch.nonzero(out.keep[g, :, e]).flatten().tolist()
            by_prob = sorted(toks, key=lambda s: -probs[g, s, e])
            assert [out.position[g, s, e].item() for s in by_prob] == list(range(len(toks)))


def test_expert_choice_hand_example():
    # S=4, E=2, cf=1: C = ceil(4/2) = 2. p(e0) = 0.9, 0.2, 0.6, 0.7 -> e0 takes t0, t3; e1 takes t1, t2.
    x = torch.tensor([[[logit(p), 0.0] for p in (0.9, 0.2, 0.6, 0.7)]])
    out = ec_router(2)(x, torch.ones(1, 4, dtype=torch.bool), top_k=1, capacity_factor=1.0)
    assert out.keep[0].tolist() == [[True, False], [False, True], [False, True], [True, False]]
    # Mask t0: e0 now takes t3 and t2 (0.7, 0.6); e1 still t1 and t2.
    out = ec_router(2)(x, torch.tensor([[False, True, True, True]]), top_k=1, capacity_factor=1.0)
    assert out.keep[0].tolist() == [[False, False], [False, True], [True, True], [True, False]]


# --------------------------------------------------------------------------------------------- soft
def test_soft_router_weights_are_convex_and_ignore_masked_tokens():
    torch.manual_seed(0)
    r = SoftRouter(16, 4, slots_per_expert=2)
    x = torch.randn(3, 10, 16)
    valid = torch.rand(3, 10) > 0.3
    valid[2] = False  # a fully masked group
    with torch.no_grad():
        dispatch, combine, logits = r(x, valid)
    assert torch.isfinite(dispatch).all() and torch.isfinite(combine).all()
    assert (dispatch >= 0).all() and (combine >= 0).all()
    assert (dispatch[~valid] == 0).all() and (combine[~valid] == 0).all()
    # Each slot is a convex mix of its group's valid tokens; each valid token a convex mix of slots.
    np.testing.assert_allclose(dispatch[:2].sum(1).numpy(), 1.0, atol=1e-6)
    assert (dispatch[2] == 0).all()
    np.testing.assert_allclose(combine[valid].sum(-1).numpy(), 1.0, atol=1e-6)
    # Independent logits: normalised tokens . normalised slot parameters * scale.
    xn = x.double().numpy()
    xn = xn / np.linalg.norm(xn, axis=-1, keepdims=True)
    phi = r.slot_embed.detach().double().numpy()
    phi = phi / np.linalg.norm(phi, axis=0, keepdims=True)
    np.testing.assert_allclose(logits.detach().numpy(), xn @ phi, atol=1e-6)


def test_routing_decides_in_fp32_under_autocast():
    # Logits 1 + 1/512 and 1: one bf16 ulp apart at 1.0 is 1/128, so a bf16 router would tie them (and take the
    # lower index); the fp32 decision picks expert 0.
    x = torch.tensor([[[1.0 + 1 / 512, 1.0, -3.0, -3.0]]])
    valid = torch.ones(1, 1, dtype=torch.bool)
    plain = topk_router(4, bpr=False)(x, valid, top_k=1, capacity_factor=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = topk_router(4, bpr=False)(x, valid, top_k=1, capacity_factor=None)
    assert mixed.logits.dtype == torch.float32 and torch.equal(mixed.logits, plain.logits)
    assert int(mixed.expert_index[0, 0, 0]) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ExpertChoiceRouter(4, 4)(x, valid, 1, 1.0).logits.dtype == torch.float32
        assert SoftRouter(4, 4)(x, valid)[2].dtype == torch.float32
