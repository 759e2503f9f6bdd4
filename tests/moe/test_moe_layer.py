"""MoELayer end to end against an independent numpy MoE layer: grouping and padding, train/eval capacity
and k, dropless, masks, modality statistics, expert-choice and soft routers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zoo.moe import MoEConfig, MoELayer, set_eval_overrides

from . import np_ref


def make_layer(D=8, H=12, seed=0, router_scale=1.0, **kw):
    kw.setdefault("importance_loss_weight", 0.0)
    kw.setdefault("load_loss_weight", 0.0)
    torch.manual_seed(seed)
    layer = MoELayer(D, H, MoEConfig(**kw))
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * (router_scale if "router" in name else 0.4))
    return layer.requires_grad_(False)


def np_params(layer):
    e = layer.experts
    return [None if t is None else t.detach().double().numpy() for t in (e.w1, e.b1, e.w2, e.b2)]


def reference_topk_layer(layer, x, mask, training_k=None, cap_factor="eval"):
    """numpy V-MoE layer: groups of ``group_size`` sequences (batch padded with invalid sequences), clean
    probabilities (eval), top-k with BPR / token order, capacity, experts. Returns y [B, S, D] and routing."""
    cfg = layer.config
    B, S, D = x.shape
    E = cfg.num_experts
    gs = min(cfg.group_size or B, B)
    G = -(-B // gs)
    xp = np.zeros((G * gs, S, D))
    xp[:B] = x.double().numpy()
    vp = np.zeros((G * gs, S), bool)
    vp[:B] = mask.numpy()
    xg, vg = xp.reshape(G, gs * S, D), vp.reshape(G, gs * S)
    probs = np_ref.softmax(xg @ layer.router.proj.weight.double().numpy().T)
    k = cfg.k(False)
    cf = cfg.capacity_setting(False)
    cap = None if cf is None else np_ref.capacity(gs * S, E, k, cf, cfg.capacity_multiple_of)
    idx, cw, keep, pos = np_ref.route_topk(probs, vg, k, cap, bpr=cfg.batch_priority, renormalize=cfg.renormalize)
    y = np_ref.moe_combine(xg.reshape(-1, D), idx.reshape(-1, k), cw.reshape(-1, k), keep.reshape(-1, k),
                           *np_params(layer), cfg.activation)
    return y.reshape(G * gs, S, D)[:B], dict(idx=idx, keep=keep, cw=cw, cap=cap, probs=probs, valid=vg, G=G, gs=gs)


LAYER_CASES = [  # B, S, group_size, E, k, cf, multiple_of, bpr, mask probability
    (16, 3, 8, 4, 2, 0.5, 1, True, 0.0),    # two full groups of 8 images, heavy dropping
    (10, 3, 8, 4, 2, 0.5, 1, True, 0.2),    # 10 images: the second group is padded with 6 invalid images
    (5, 4, 8, 4, 2, 1.05, 4, True, 0.0),    # batch smaller than a group: one group of 5 images
    (6, 5, 2, 8, 2, 1.05, 4, False, 0.3),   # V-MoE defaults but token order
    (7, 2, 3, 4, 1, 1.0, 1, True, 0.0),
    (4, 6, None, 4, 2, 0.75, 1, True, 0.1),  # group_size None: the whole batch
]


@pytest.mark.parametrize("B,S,gs,E,k,cf,mult,bpr,pmask", LAYER_CASES)
def test_layer_matches_numpy_layer(B, S, gs, E, k, cf, mult, bpr, pmask):
    layer = make_layer(num_experts=E, top_k=k, group_size=gs, capacity_factor=cf, capacity_multiple_of=mult,
                       batch_priority=bpr, router_scale=1.5).eval()
    gen = torch.Generator().manual_seed(B * S)
    x = torch.randn(B, S, 8, generator=gen)
    mask = torch.rand(B, S, generator=gen) >= pmask
    y = layer(x, mask=mask)
    ref, r = reference_topk_layer(layer, x, mask)
    np.testing.assert_allclose(y.numpy(), ref, atol=2e-5, rtol=1e-4)
    stats = layer.aux.stats
    assert stats.capacity == r["cap"]
    kept = np.zeros(E)
    np.add.at(kept, r["idx"][r["keep"]], 1)
    np.testing.assert_array_equal(stats.tokens_per_expert.numpy(), kept)
    n_slots = r["valid"].sum() * k
    assert stats.dropped_fraction.item() == pytest.approx(1 - r["keep"].sum() / n_slots, abs=1e-6)
    imp = (r["probs"] * r["valid"][..., None]).sum((0, 1))
    np.testing.assert_allclose(stats.importance.numpy(), imp / imp.sum(), atol=1e-5)
    top1 = np.where(r["valid"], r["probs"].argmax(-1), -1).reshape(-1, S)[:B]
    np.testing.assert_array_equal(stats.top1_expert.numpy(), top1)
    assert (y[~mask] == 0).all()
    assert 0 < r["keep"].sum() < n_slots or cf >= 1.0  # the dropping cases do drop


def test_padding_the_last_group_matches_a_smaller_group_with_scaled_capacity():
    """10 images with groups of 8: the last group holds 2 images + 6 invalid ones. Its capacity is that of
    8 images, i.e. C(2 images, 4 * cf); padding changes nothing else."""
    a = make_layer(num_experts=4, top_k=2, group_size=8, capacity_factor=0.5, capacity_multiple_of=1,
                   router_scale=1.5).eval()
    b = make_layer(num_experts=4, top_k=2, group_size=2, capacity_factor=2.0, capacity_multiple_of=1,
                   router_scale=1.5).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(10, 3, 8, generator=torch.Generator().manual_seed(0))
    ya = a(x)
    assert a.aux.stats.capacity == 6  # ceil(24 * 2 * 0.5 / 4)
    yb = b(x[8:])
    assert b.aux.stats.capacity == 6  # ceil(6 * 2 * 2.0 / 4)
    torch.testing.assert_close(ya[8:], yb, rtol=1e-6, atol=1e-6)
    assert a.aux.stats.dropped_fraction > 0  # the full first group does drop at this capacity


def test_train_and_eval_capacity_factor_and_k():
    E, S, B = 4, 6, 2
    layer = make_layer(num_experts=E, top_k=2, group_size=None, capacity_factor=0.5, eval_capacity_factor=1.5,
                       capacity_multiple_of=1)
    seen = []
    layer.router.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(B, S, 8)
    layer.train()(x)
    assert seen[-1].capacity == 3 and seen[-1].expert_index.shape[-1] == 2  # ceil(12 * 2 * 0.5 / 4)
    assert seen[-1].noise_std > 0
    layer.eval()(x)
    assert seen[-1].capacity == 9 and seen[-1].noise_std == 0.0             # ceil(12 * 2 * 1.5 / 4)
    set_eval_overrides(layer, capacity_factor=2.0, top_k=1)
    y = layer(x)
    assert seen[-1].capacity == 6 and seen[-1].expert_index.shape[-1] == 1  # ceil(12 * 1 * 2 / 4)
    ref, _ = reference_topk_layer(layer, x, torch.ones(B, S, dtype=torch.bool))
    np.testing.assert_allclose(y.numpy(), ref, atol=2e-5, rtol=1e-4)
    layer.train()(x)
    assert seen[-1].capacity == 3 and seen[-1].expert_index.shape[-1] == 2  # training is untouched
    set_eval_overrides(layer, dropless=True)
    layer.eval()(x)
    assert seen[-1].capacity is None and bool(seen[-1].keep.all())
    with pytest.raises(ValueError):
        set_eval_overrides(layer, top_k=E + 1)


@pytest.mark.parametrize("training", [True, False])
def test_dropless_keeps_every_valid_slot(training):
    E = 4
    layer = make_layer(num_experts=E, top_k=2, group_size=None, dropless=True, eval_dropless=None)
    with torch.no_grad():  # every token strongly prefers expert 0
        layer.router.proj.weight.zero_()
        layer.router.proj.weight[0, 0] = 50.0
    x = torch.randn(3, 8, 8)
    x[..., 0] = x[..., 0].abs() + 1
    mask = torch.rand(3, 8) > 0.2
    layer.train(training)(x, mask=mask)
    st = layer.aux.stats
    n = int(mask.sum())
    assert st.capacity is None and st.dropped_fraction.item() == 0.0
    assert st.tokens_per_expert[0].item() == n and st.tokens_per_expert.sum().item() == 2 * n
    # The same batch with a capacity: expert 0 takes exactly C = ceil(24 * 2 * 1.05 / 4) = 13 -> 16 slots.
    layer.config.dropless = False
    layer.train(training)(x, mask=mask)
    assert layer.aux.stats.tokens_per_expert[0].item() == min(n, 16)


def test_modality_statistics_match_reference():
    E, B, S = 4, 4, 6
    layer = make_layer(num_experts=E, top_k=2, group_size=2, capacity_factor=0.75, capacity_multiple_of=1,
                       num_modalities=3, router_scale=1.5).eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, S, 8, generator=gen)
    mask = torch.rand(B, S, generator=gen) > 0.2
    modality = torch.randint(0, 3, (B, S), generator=gen)
    layer(x, mask=mask, modality=modality)
    _, r = reference_topk_layer(layer, x, mask)
    mod = modality.numpy().reshape(r["G"], -1)
    by_mod = np.zeros((3, E))
    dropped = np.zeros(3)
    for m in range(3):
        sel = r["valid"] & (mod == m)
        for slot in range(2):
            np.add.at(by_mod[m], r["idx"][..., slot][sel & r["keep"][..., slot]], 1)
        dropped[m] = 1 - (r["keep"] & sel[..., None]).sum() / (2 * sel.sum())
    st = layer.aux.stats
    np.testing.assert_array_equal(st.tokens_per_expert_by_modality.numpy(), by_mod)
    np.testing.assert_allclose(st.dropped_fraction_by_modality.numpy(), dropped, atol=1e-6)
    np.testing.assert_array_equal(st.tokens_per_expert.numpy(), by_mod.sum(0))


def test_layer_rejects_bad_shapes():
    layer = make_layer(num_experts=4)
    with pytest.raises(ValueError, match="D=8"):
        layer(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="modality"):
        layer(torch.randn(2, 3, 8), modality=torch.zeros(3, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------- expert choice
def test_expert_choice_layer_each_expert_takes_capacity_tokens():
    E, B, S = 4, 4, 5
    layer = make_layer(router="expert_choice", num_experts=E, top_k=1, group_size=2, capacity_factor=1.0,
                       capacity_multiple_of=1, router_scale=1.5).eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, S, 8, generator=gen)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, :3] = False
    y = layer(x, mask=mask)
    C = 3  # ceil(10 tokens * 1.0 / 4)
    st = layer.aux.stats
    assert st.capacity == C
    np.testing.assert_array_equal(st.tokens_per_expert.numpy(), [2 * C] * E)  # 2 groups, C each
    # numpy: each expert's top-C valid tokens by probability, combined with those probabilities.
    xg = x.double().numpy().reshape(2, 2 * S, 8)
    probs = np_ref.softmax(xg @ layer.router.proj.weight.double().numpy().T)
    keep, cw = np_ref.route_expert_choice(probs, mask.numpy().reshape(2, -1), C)
    assert not keep[~mask.numpy().reshape(2, -1)].any()
    idx = np.broadcast_to(np.arange(E), keep.shape)
    ref = np_ref.moe_combine(xg.reshape(-1, 8), idx.reshape(-1, E), cw.reshape(-1, E), keep.reshape(-1, E),
                             *np_params(layer), layer.config.activation)
    np.testing.assert_allclose(y.numpy(), ref.reshape(B, S, 8), atol=2e-5, rtol=1e-4)
    assert (y[~mask] == 0).all()
    # Fewer valid tokens than C in a group: every expert takes all of them and no masked one.
    mask2 = torch.zeros(B, S, dtype=torch.bool)
    mask2[0, 0] = mask2[3, 1] = True
    layer(x, mask=mask2)
    np.testing.assert_array_equal(layer.aux.stats.tokens_per_expert.numpy(), [2] * E)


# --------------------------------------------------------------------------------------------- soft
def test_soft_layer_matches_numpy_and_zeroes_masked_tokens():
    E, P, B, S, D = 3, 2, 4, 5, 8
    layer = make_layer(router="soft", num_experts=E, slots_per_expert=P, group_size=2).eval()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(B, S, D, generator=gen)
    mask = torch.rand(B, S, generator=gen) > 0.3
    mask[2:] = False  # the whole second group is masked
    y = layer(x, mask=mask)
    assert torch.isfinite(y).all()
    assert (y[~mask] == 0).all()
    xg = x.double().numpy().reshape(2, 2 * S, D)
    vg = mask.numpy().reshape(2, -1)
    phi = layer.router.slot_embed.double().numpy()
    logits = (xg / np.linalg.norm(xg, axis=-1, keepdims=True)) @ (phi / np.linalg.norm(phi, axis=0))
    logits = logits * layer.router.scale.item()
    w1, b1, w2, b2 = np_params(layer)
    ref = np.zeros_like(xg)
    for g in range(2):
        if not vg[g].any():
            continue
        disp = np.where(vg[g][:, None], np.exp(logits[g]), 0.0)
        disp = disp / disp.sum(0, keepdims=True)             # softmax over the group's valid tokens
        slots = disp.T @ xg[g]                                # [E*P, D]
        outs = np.concatenate([np_ref.expert(slots[e * P:(e + 1) * P], w1[e], b1[e], w2[e], b2[e], "gelu_tanh")
                               for e in range(E)])
        comb = np_ref.softmax(logits[g]) * vg[g][:, None]     # softmax over slots, masked rows 0
        ref[g] = comb @ outs
    np.testing.assert_allclose(y.numpy(), ref.reshape(B, S, D), atol=2e-5, rtol=1e-4)


def test_capacity_from_valid_tokens_makes_padding_invisible():
    """With ``capacity_from_valid_tokens`` the capacity comes from the valid tokens (of the fullest group), so a
    padded batch routes exactly like the same batch without its padding, capacity limits included."""
    layer = make_layer(num_experts=4, top_k=2, group_size=1, capacity_factor=0.5, capacity_multiple_of=1,
                       capacity_from_valid_tokens=True, router_scale=2.0).eval()
    x = torch.randn(3, 9, 8, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[:, :6] = True
    y = layer(x, mask=mask)
    st = layer.aux.stats
    assert st.capacity == 2  # ceil(6 * 2 * 0.5 / 4) = ceil(1.5); all 9 tokens would give ceil(2.25) = 3
    y2 = layer(x[:, :6])
    torch.testing.assert_close(y[:, :6], y2, rtol=0, atol=1e-6)
    assert (y[:, 6:] == 0).all()
    assert st.dropped_fraction.item() == pytest.approx(layer.aux.stats.dropped_fraction.item())
    assert st.dropped_fraction.item() > 0  # capacity is binding, so the comparison means something
    # More padding changes nothing; without the option the capacity would come from all 14 tokens:
    # ceil(14 * 2 * 0.5 / 4) = ceil(3.5) = 4.
    xp = torch.cat([x, torch.randn(3, 5, 8)], dim=1)
    mp = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(layer(xp, mask=mp)[:, :6], y2, rtol=0, atol=1e-6)
    assert layer.aux.stats.capacity == 2
    layer.router.capacity_from_valid_tokens = False
    layer(xp, mask=mp)
    assert layer.aux.stats.capacity == 4


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that copies a tensor value to the host (``.item()``, ``bool(t)``, ``.tolist()``): on
    CUDA each one stalls the launch queue until the GPU catches up, which made the layer launch-bound."""

    HOST_READS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::_is_all_true")

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.HOST_READS:
            self.reads.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _dense_dispatch(x, expert_index, combine_weight, keep, experts):
    E = experts.w1.shape[0]
    every = experts.forward_dense(x.unsqueeze(0).expand(E, *x.shape))  # [E, T, D]
    picked = every[expert_index, torch.arange(x.shape[0]).unsqueeze(-1)]  # [T, K, D]
    return (picked * (combine_weight * keep).unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("router,extra", [
    ("topk", dict(importance_loss_weight=0.01, load_loss_weight=0.01, switch_loss_weight=0.01, z_loss_weight=1e-3)),
    ("topk", dict(num_modalities=2, local_entropy_weight=0.01, global_entropy_weight=0.01,
                  importance_loss_weight=0.0, load_loss_weight=0.0)),
    ("topk", dict(dropless=True, renormalize=True, batch_priority=False)),
    ("expert_choice", dict()),
    ("soft", dict()),
])
def test_training_step_reads_nothing_back_to_the_host(router, extra):
    cfg = MoEConfig(num_experts=4, top_k=2, router=router, noise_std=1.0, capacity_factor=1.05, group_size=2,
                    dispatch="sorted", **extra)
    layer = MoELayer(8, 16, cfg).train()
    # The CPU reference dispatchers read expert row counts back by design (the fused CUDA path does not, see
    # tests/kernels): every expert on every token here, so only router, losses and statistics are checked.
    layer.expert_dispatcher = _dense_dispatch
    x = torch.randn(5, 6, 8, requires_grad=True)
    mask = torch.rand(5, 6) > 0.2
    modality = (torch.arange(6) >= 3).long().expand(5, 6) if cfg.num_modalities > 1 else None
    with _HostReads() as mode:
        y = layer(x, mask, modality)
        outputs = [y] + ([layer.aux.loss] if layer.aux.loss.requires_grad else [])
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
    assert x.grad is not None
    assert mode.reads == [], f"host reads in the {router} training step: {mode.reads}"
