"""Auxiliary losses against hand-computed values and the numpy reference, alone and through MoELayer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zoo.moe import MoEConfig, MoELayer
from zoo.moe import losses as L

from . import np_ref

T = torch.tensor
ALL = torch.ones


# ------------------------------------------------------------------------------------- hand values
def test_importance_loss_hand_values():
    probs = T([[[0.9, 0.1], [0.7, 0.3]]])  # importance [1.6, 0.4]: mean 1, POPULATION std 0.6 -> 0.36
    assert L.importance_loss(probs, ALL(1, 2, dtype=torch.bool)).item() == pytest.approx(0.36, rel=1e-6)
    balanced = T([[[0.75, 0.25], [0.25, 0.75]]])  # importance [1, 1] -> 0
    assert L.importance_loss(balanced, ALL(1, 2, dtype=torch.bool)).item() == pytest.approx(0.0, abs=1e-12)
    # Mean over groups: (0.36 + 0) / 2.
    both = torch.cat([probs, balanced])
    assert L.importance_loss(both, ALL(2, 2, dtype=torch.bool)).item() == pytest.approx(0.18, rel=1e-6)
    # A masked token (appended, heavily one-sided) changes nothing.
    extra = T([[[0.9, 0.1], [0.7, 0.3], [0.0, 1.0]]])
    assert L.importance_loss(extra, T([[True, True, False]])).item() == pytest.approx(0.36, rel=1e-6)


def test_switch_loss_hand_value():
    # top-1 fractions f = [1, 0], mean probabilities P = [0.85, 0.15]: E * sum f P = 2 * 0.85 = 1.7.
    probs = T([[[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]]])
    idx = T([[[0], [0], [1]]])
    assert L.switch_loss(probs, idx, T([[True, True, False]])).item() == pytest.approx(1.7, rel=1e-6)
    # Perfect balance gives 1: f = [.5, .5], P = [.5, .5].
    bal = T([[[0.6, 0.4], [0.4, 0.6]]])
    assert L.switch_loss(bal, T([[[0], [1]]]), ALL(1, 2, dtype=torch.bool)).item() == pytest.approx(1.0)


def test_z_loss_hand_value():
    logits = T([[[0.0, 0.0], [1.0, 1.0], [50.0, -3.0]]])
    valid = T([[True, True, False]])
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert L.z_loss(logits, valid).item() == pytest.approx(expected, rel=1e-6)


def test_local_entropy_hand_value():
    probs = T([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert L.local_entropy_loss(probs, T([True, True, False])).item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    assert L.local_entropy_loss(probs, T([False, False, True])).item() == pytest.approx(math.log(4), rel=1e-6)
    assert L.local_entropy_loss(probs, T([False, False, False])).item() == 0.0


def test_global_entropy_hand_values():
    # Mean distribution [0.5, 0.5, 0, 0]: H = log 2. Loss = max(0, log(min_experts) - log 2).
    probs = T([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    valid = T([True, True, False])
    assert L.global_entropy_loss(probs, valid, 4.0).item() == pytest.approx(math.log(2), rel=1e-6)
    assert L.global_entropy_loss(probs, valid, 3.0).item() == pytest.approx(math.log(3) - math.log(2), rel=1e-6)
    assert L.global_entropy_loss(probs, valid, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert L.global_entropy_loss(probs, valid, 1.0).item() == 0.0
    # All three tokens: mean [1/3, 1/3, 0, 1/3], H = log 3 -> with min 4: log 4 - log 3.
    assert L.global_entropy_loss(probs, ALL(3, dtype=torch.bool), 4.0).item() == pytest.approx(
        math.log(4) - math.log(3), rel=1e-6)


def test_load_loss_hand_value():
    # One group, two tokens, E=2, k=1, noise std 0.5. Threshold = the top noisy logit.
    logits = T([[[1.0, 0.0], [0.0, 0.0]]])
    noisy = T([[[1.2, -0.1], [0.3, 0.1]]])
    # token 0: thr 1.2 -> p = [1-Phi(0.4), 1-Phi(2.4)]; token 1: thr 0.3 -> [1-Phi(0.6), 1-Phi(0.6)].
    q = lambda z: 1 - 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    pm = np.array([(q(0.4) + q(0.6)) / 2, (q(2.4) + q(0.6)) / 2])
    expected = (pm.std() / pm.mean()) ** 2
    got = L.load_loss(logits, noisy, 0.5, 1, ALL(1, 2, dtype=torch.bool)).item()
    assert got == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------ numpy, random, masks
@pytest.mark.parametrize("G,S,E,k", [(1, 16, 4, 1), (3, 24, 8, 2), (2, 10, 3, 2)])
def test_losses_match_numpy_reference(G, S, E, k):
    gen = torch.Generator().manual_seed(G * S * E)
    logits = torch.randn(G, S, E, generator=gen, dtype=torch.float64)
    std = 1.0 / E
    noisy = logits + std * torch.randn(G, S, E, generator=gen, dtype=torch.float64)
    valid = torch.rand(G, S, generator=gen) > 0.3
    valid[0, 0] = True
    if G > 2:
        valid[1] = False  # a fully masked group must not dilute the per-group means
    probs = torch.softmax(logits, -1)
    lg, nz, vd, pr = logits.numpy(), noisy.numpy(), valid.numpy(), probs.numpy()
    assert L.importance_loss(probs, valid).item() == pytest.approx(np_ref.importance_loss(pr, vd), rel=1e-9)
    assert L.load_loss(logits, noisy, std, k, valid).item() == pytest.approx(
        np_ref.load_loss(lg, nz, std, k, vd), rel=1e-6)
    idx = torch.topk(probs, k, -1).indices
    assert L.switch_loss(probs, idx, valid).item() == pytest.approx(np_ref.switch_loss(pr, vd), rel=1e-9)
    assert L.z_loss(logits, valid).item() == pytest.approx(np_ref.z_loss(lg, vd), rel=1e-9)
    # Dropping the masked tokens (and masked groups) from the tensors gives the same losses.
    for g in range(G):
        if not valid[g].any():
            continue
        sel = valid[g]
        one = lambda t: t[g][sel].unsqueeze(0)  # noqa: E731
        ones = ALL(1, int(sel.sum()), dtype=torch.bool)
        assert L.importance_loss(probs[g:g + 1], valid[g:g + 1]).item() == pytest.approx(
            L.importance_loss(one(probs), ones).item(), rel=1e-9)
        assert L.load_loss(logits[g:g + 1], noisy[g:g + 1], std, k, valid[g:g + 1]).item() == pytest.approx(
            L.load_loss(one(logits), one(noisy), std, k, ones).item(), rel=1e-9)


def test_fully_masked_group_does_not_change_group_means():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)
    noisy = logits + 0.25 * torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    idx = torch.topk(probs, 2, -1).indices
    valid = ALL(2, 6, dtype=torch.bool)
    masked = valid.clone()
    masked[1] = False
    for fn, args in ((L.importance_loss, (probs,)), (L.load_loss, (logits, noisy, 0.25, 2)),
                     (L.switch_loss, (probs, idx)), (L.z_loss, (logits,))):
        with_group = fn(*args, masked).item()
        alone = fn(*[a[:1] if isinstance(a, torch.Tensor) else a for a in args], valid[:1]).item()
        assert with_group == pytest.approx(alone, rel=1e-12), fn.__name__


# ------------------------------------------------------------------------------- through MoELayer
def capture_routing(layer):
    seen = []
    layer.router.register_forward_hook(lambda mod, inp, out: seen.append(out))
    return seen


def all_losses_layer(E=4, D=6, M=2, **kw):
    cfg = MoEConfig(num_experts=E, top_k=2, group_size=2, capacity_multiple_of=1, num_modalities=M,
                    importance_loss_weight=0.1, load_loss_weight=0.2, switch_loss_weight=0.3, z_loss_weight=0.4,
                    local_entropy_weight=0.5, global_entropy_weight=0.6, global_entropy_min_experts=3.0, **kw)
    torch.manual_seed(0)
    layer = MoELayer(D, 8, cfg)
    with torch.no_grad():
        layer.router.proj.weight.normal_(0, 1.0)
    return layer


def test_layer_losses_match_numpy_reference():
    layer = all_losses_layer().train()
    layer.router.generator = torch.Generator().manual_seed(1)
    seen = capture_routing(layer)
    B, S, D, E = 4, 5, 6, 4
    x = torch.randn(B, S, D)
    mask = torch.rand(B, S) > 0.25
    mask[:, 0] = True
    modality = (torch.arange(S) >= 2).long().expand(B, S)
    layer(x, mask=mask, modality=modality)
    r = seen[-1]
    assert r.noise_std == pytest.approx(1.0 / E)
    # Clean logits are x W^T (no bias), computed independently; groups are 2 consecutive images.
    W = layer.router.proj.weight.detach().double().numpy()
    lg = x.double().numpy().reshape(2, 2 * S, D) @ W.T
    np.testing.assert_allclose(r.logits.detach().numpy(), lg, atol=1e-5)
    nz = r.noisy_logits.detach().double().numpy()
    vd = mask.numpy().reshape(2, 2 * S)
    md = modality.numpy().reshape(2, 2 * S)
    pc = np_ref.softmax(lg)
    pn = np_ref.softmax(nz)
    losses = layer.aux.losses
    assert losses["importance_loss"].item() == pytest.approx(np_ref.importance_loss(pc, vd), rel=1e-5)
    assert losses["load_loss"].item() == pytest.approx(np_ref.load_loss(lg, nz, 1.0 / E, 2, vd), rel=1e-4)
    assert losses["switch_loss"].item() == pytest.approx(np_ref.switch_loss(pn, vd), rel=1e-5)
    assert losses["z_loss"].item() == pytest.approx(np_ref.z_loss(lg, vd), rel=1e-5)
    for m in range(2):
        sel = vd & (md == m)
        ents = [np_ref.entropy(p) for p in pc[sel]]
        assert losses[f"local_entropy_m{m}"].item() == pytest.approx(np.mean(ents), rel=1e-5)
        glob = max(0.0, math.log(3.0) - np_ref.entropy(pc[sel].mean(0)))
        assert losses[f"global_entropy_m{m}"].item() == pytest.approx(glob, rel=1e-5, abs=1e-7)
    weights = {"importance_loss": 0.1, "load_loss": 0.2, "switch_loss": 0.3, "z_loss": 0.4,
               "local_entropy_m0": 0.5, "local_entropy_m1": 0.5, "global_entropy_m0": 0.6, "global_entropy_m1": 0.6}
    assert set(losses) == set(weights)
    total = sum(w * losses[n].item() for n, w in weights.items())
    assert layer.aux.loss.item() == pytest.approx(total, rel=1e-6)


def test_eval_reports_no_load_loss():
    layer = all_losses_layer().eval()
    layer(torch.randn(2, 5, 6))
    assert "load_loss" not in layer.aux.losses and "importance_loss" in layer.aux.losses


def test_masked_tokens_do_not_change_layer_losses():
    """Same batch with masked tokens vs. with those tokens removed (eval: no noise, so the same routing).

    group_size=1: removing the masked tail of every sequence and a fully masked sequence keeps shapes valid.
    """
    layer = all_losses_layer().eval()
    layer.config.group_size = 1
    torch.manual_seed(3)
    x = torch.randn(3, 7, 6)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, 5:] = False          # padded tail
    mask[1] = False              # a fully padded sequence
    modality = torch.tensor([0, 0, 1, 1, 1, 0, 1]).expand(3, 7)
    y = layer(x, mask=mask, modality=modality)
    full = {k: v.item() for k, v in layer.aux.losses.items()}
    stats = layer.aux.stats
    assert (y[~mask] == 0).all()
    keep_rows = torch.tensor([0, 2])
    y2 = layer(x[keep_rows, :5], modality=modality[keep_rows, :5])
    short = {k: v.item() for k, v in layer.aux.losses.items()}
    assert set(full) == set(short)
    for name in full:
        assert full[name] == pytest.approx(short[name], rel=1e-6, abs=1e-9), name
    # Capacity here is C(7 tokens) vs C(5 tokens): compare outputs and counts only when dropless.
    layer.config.eval_dropless = True
    y = layer(x, mask=mask, modality=modality)
    stats = layer.aux.stats
    y2 = layer(x[keep_rows, :5], modality=modality[keep_rows, :5])
    torch.testing.assert_close(y[keep_rows, :5], y2, rtol=0, atol=1e-6)
    assert torch.equal(stats.tokens_per_expert_by_modality, layer.aux.stats.tokens_per_expert_by_modality)
    assert stats.tokens_per_expert_by_modality.sum().item() == 2 * 5 * 2  # 10 valid tokens x k=2
