"""Uni-MoE v2's auxiliary losses (issue 20): the per-modality target-expert L1 loss and the cross-modality KL loss,
against loop-by-loop numpy references of their definitions, through the MoE layer (reported, weighted, gradient to
the router, off at weight 0) and their config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zoo.moe import MoEConfig, MoELayer
from zoo.moe import losses as L

TARGETS = ((), (0, 1), (2,))  # modality 0 (text) has no target


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_target_loss(p, valid, mod, targets, E):
    """Per group: for each modality with targets, mean |p - t| over its valid tokens and the E experts, times the
    modality's share of the group's valid tokens; summed over modalities; mean over groups with valid tokens."""
    per_group = []
    for g in range(p.shape[0]):
        n = valid[g].sum()
        if n == 0:
            continue
        total = 0.0
        for m, ids in enumerate(targets):
            tok = [s for s in range(p.shape[1]) if valid[g, s] and mod[g, s] == m]
            if not ids or not tok:
                continue
            t = np.zeros(E)
            t[list(ids)] = 1.0
            l1 = np.mean([abs(p[g, s, e] - t[e]) for s in tok for e in range(E)])
            total += len(tok) / n * l1
        per_group.append(total)
    return float(np.mean(per_group)) if per_group else 0.0


def np_kl_loss(p, valid, mod, pairs, E):
    """Per group: 1 - KL(softmax(q_b) || softmax(q_a)) / E for each pair with both modalities present (q = mean
    probability of the modality's valid tokens), averaged over those pairs; mean over groups with such a pair."""
    per_group = []
    for g in range(p.shape[0]):
        q = {}
        for m in set(int(v) for v in mod[g]):
            tok = [s for s in range(p.shape[1]) if valid[g, s] and mod[g, s] == m]
            if tok:
                q[m] = p[g, tok].mean(0)
        terms = []
        for a, b in pairs:
            if a in q and b in q:
                sa, sb = np_softmax(q[a]), np_softmax(q[b])
                terms.append(1.0 - np.sum(sb * np.log(sb / sa)) / E)
        if terms:
            per_group.append(np.mean(terms))
    return float(np.mean(per_group)) if per_group else 0.0


def case(seed=0, G=3, S=7, E=4, M=3, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(G, S, E, generator=g, dtype=torch.float64) * scale, -1)
    valid = torch.rand(G, S, generator=g) > 0.25
    valid[0, :2] = True
    mod = torch.randint(0, M, (G, S), generator=g)
    mod[0, 0], mod[0, 1] = 1, 2  # group 0 has modalities 1 and 2
    return probs, valid, mod


def targets_tensor(targets, E):
    return torch.tensor([[1.0 if e in ids else 0.0 for e in range(E)] for ids in targets], dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_target_expert_loss_matches_numpy(seed):
    probs, valid, mod = case(seed)
    got = L.target_expert_loss(probs, valid, mod, targets_tensor(TARGETS, 4))
    want = np_target_loss(probs.numpy(), valid.numpy(), mod.numpy(), TARGETS, 4)
    assert abs(got.item() - want) < 1e-12
    # No modality ids: every token is modality 0, which has no target here -> 0; with a target for 0 it counts.
    assert L.target_expert_loss(probs, valid, None, targets_tensor(TARGETS, 4)).item() == 0.0
    got0 = L.target_expert_loss(probs, valid, None, targets_tensor(((3,), (), ()), 4))
    want0 = np_target_loss(probs.numpy(), valid.numpy(), np.zeros_like(mod.numpy()), ((3,), (), ()), 4)
    assert abs(got0.item() - want0) < 1e-12


def test_target_expert_loss_by_hand():
    """One group, E=2: tokens [0.9, 0.1] (modality 1, target expert 0) and [0.3, 0.7] (text, no target), one
    padding token. L = |0.9-1| + |0.1-0| over (E=2 * N=2 valid tokens) = 0.2 / 4 = 0.05."""
    probs = torch.tensor([[[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]]], dtype=torch.float64)
    valid = torch.tensor([[True, True, False]])
    mod = torch.tensor([[1, 0, 1]])
    targets = targets_tensor(((), (0,)), 2)
    assert abs(L.target_expert_loss(probs, valid, mod, targets).item() - 0.05) < 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_modality_kl_loss_matches_numpy(seed):
    probs, valid, mod = case(seed)
    for pairs in ([(0, 1), (0, 2), (1, 2)], [(2, 0), (1, 2)]):
        got = L.cross_modality_kl_loss(probs, valid, mod, torch.tensor(pairs), 3)
        want = np_kl_loss(probs.numpy(), valid.numpy(), mod.numpy(), pairs, 4)
        assert abs(got.item() - want) < 1e-12, pairs


def test_cross_modality_kl_term_is_the_official_kldiv_batchmean():
    """One group, two modalities: the term equals 1 - KLDivLoss(batchmean)(log_softmax(q_a), softmax(q_b)), the
    official expression over the modalities' mean gates."""
    probs, _, _ = case(5, G=1, S=6)
    valid = torch.ones(1, 6, dtype=torch.bool)
    mod = torch.tensor([[0, 1, 1, 0, 1, 1]])
    qa, qb = probs[0, mod[0] == 1].mean(0), probs[0, mod[0] == 0].mean(0)
    want = 1.0 - torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(qa, 0), torch.softmax(qb, 0))
    got = L.cross_modality_kl_loss(probs, valid, mod, torch.tensor([[1, 0]]), 2)
    assert abs(got.item() - want.item()) < 1e-12
    # no group with both modalities: 0
    assert L.cross_modality_kl_loss(probs, valid, torch.zeros_like(mod), torch.tensor([[1, 0]]), 2).item() == 0.0


def test_losses_have_the_gradient_of_their_definition():
    probs, valid, mod = case(3)
    probs = probs.requires_grad_(True)
    torch.autograd.gradcheck(lambda p: L.target_expert_loss(p, valid, mod, targets_tensor(TARGETS, 4)), (probs,))
    torch.autograd.gradcheck(lambda p: L.cross_modality_kl_loss(p, valid, mod, torch.tensor([[0, 1], [1, 2]]), 3),
                             (probs,))


def make_layer(**kw):
    cfg = dict(num_experts=4, top_k=2, num_modalities=3, importance_loss_weight=0.0, load_loss_weight=0.0,
               group_size=2, capacity_factor=2.0, noise_std=0.0, target_experts_by_modality=TARGETS)
    cfg.update(kw)
    torch.manual_seed(0)
    return MoELayer(8, 12, MoEConfig(**cfg))


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_layer_reports_weights_and_differentiates_the_losses(router):
    layer = make_layer(router=router, target_expert_loss_weight=0.3, cross_modality_kl_weight=0.2)
    layer.record_routing = True
    x = torch.randn(4, 6, 8)
    mask = torch.rand(4, 6) > 0.2
    mod = torch.randint(0, 3, (4, 6))
    layer(x, mask=mask, modality=mod)
    aux = layer.aux
    assert set(aux.losses) == {"target_expert_loss", "cross_modality_kl_loss"}
    # the reported values are the functions on the layer's groups (2 sequences each) of clean probabilities
    p = layer.last_routing.probs.double().reshape(2, 12, 4).numpy()
    v, m = mask.reshape(2, 12).numpy(), mod.reshape(2, 12).numpy()
    want_t = np_target_loss(p, v, m, TARGETS, 4)
    want_kl = np_kl_loss(p, v, m, [(0, 1), (0, 2), (1, 2)], 4)
    assert abs(aux.losses["target_expert_loss"].item() - want_t) < 1e-5
    assert abs(aux.losses["cross_modality_kl_loss"].item() - want_kl) < 1e-5
    assert abs(aux.loss.item() - (0.3 * want_t + 0.2 * want_kl)) < 1e-5
    aux.loss.backward()
    grad = layer.router.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # each loss alone reaches the router
    for name in ("target_expert_loss_weight", "cross_modality_kl_weight"):
        one = make_layer(router=router, **{name: 1.0})
        one(x, mask=mask, modality=mod)
        one.aux.loss.backward()
        assert one.router.proj.weight.grad.abs().sum() > 0, name


def test_weight_zero_switches_them_off():
    layer = make_layer()
    layer(torch.randn(2, 5, 8), modality=torch.randint(0, 3, (2, 5)))
    assert layer.aux.losses == {} and layer.aux.loss.item() == 0.0 and not layer.aux.loss.requires_grad


def test_bad_settings_and_inputs_raise():
    with pytest.raises(ValueError, match="target_experts_by_modality"):
        make_layer(target_expert_loss_weight=0.1, target_experts_by_modality=None)
    with pytest.raises(ValueError, match="target_experts_by_modality"):
        make_layer(target_experts_by_modality=((0,), (1,)))  # 2 entries for 3 modalities
    with pytest.raises(ValueError, match="distinct"):
        make_layer(target_experts_by_modality=((), (0, 0), (2,)))
    with pytest.raises(ValueError, match="distinct"):
        make_layer(target_experts_by_modality=((), (4,), (2,)))
    with pytest.raises(ValueError, match="num_modalities"):
        make_layer(num_modalities=1, target_experts_by_modality=((1,),), cross_modality_kl_weight=0.1)
    with pytest.raises(ValueError, match="cross_modality_kl_pairs"):
        make_layer(cross_modality_kl_pairs=((0, 3),))
    with pytest.raises(ValueError, match="cross_modality_kl_pairs"):
        make_layer(cross_modality_kl_pairs=((1, 1),))
    with pytest.raises(ValueError, match="soft"):
        make_layer(router="soft", cross_modality_kl_weight=0.1)
    with pytest.raises(ValueError, match="target_expert_loss_weight must be"):
        make_layer(target_expert_loss_weight=-1.0)
    layer = make_layer(cross_modality_kl_weight=0.1)
    with pytest.raises(ValueError, match="modality ids"):
        layer(torch.randn(2, 5, 8))
    # YAML lists become tuples
    from zoo.config import from_dict
    cfg = from_dict(MoEConfig, {"num_modalities": 2, "target_experts_by_modality": [[], [0, 1]],
                                "cross_modality_kl_pairs": [[1, 0]], "cross_modality_kl_weight": 0.1})
    assert cfg.target_experts_by_modality == ((), (0, 1)) and cfg.kl_pairs() == [(1, 0)]


def test_uni_moe_preset_turns_them_on():
    """A Uni-MoE config sets them under ``decoder.moe`` (ids 0 text, 1 image, 2 video, 3 audio; the official pairs);
    the model's MoE layers get modality ids and report both losses."""
    import zoo
    from zoo.models.uni_moe import IMAGE_TOKEN_ID

    over = {"decoder.moe.target_expert_loss_weight": 0.1,
            "decoder.moe.target_experts_by_modality": [[], [0], [1], [2, 3]],
            "decoder.moe.cross_modality_kl_weight": 0.1,
            "decoder.moe.cross_modality_kl_pairs": [[1, 3], [1, 0], [3, 0], [3, 2], [2, 0]]}
    torch.manual_seed(0)
    model = zoo.create_model("uni_moe_tiny", **over)
    S = model.config.vision.image_size
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, 6, 7]])
    out = model(ids, images=torch.randn(1, 3, S, S))
    routers = [m.router.proj.weight for m in zoo.moe.layer.moe_layers(model)]
    # summed over the MoE layers; each layer's KL term is at most 1
    assert out.aux_losses["target_expert_loss"] > 0 and 0 < out.aux_losses["cross_modality_kl_loss"] <= len(routers)
    out.aux_loss.backward()
    assert routers and all(w.grad is not None and w.grad.abs().sum() > 0 for w in routers)
