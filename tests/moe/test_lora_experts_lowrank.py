"""LoRA experts' low-rank path (zoo.moe.lowrank, issue 20): equal to the merged reference in outputs and gradients
(LoRA factors, router / combine weights, input) for per-expert and shared bases, top-1 / top-2, with dropped slots
and dropless; taken in a training step (no merge) and not in inference; the torch._grouped_mm / per-expert-loop
choice; the eval-mode merge cache."""

import pytest
import torch

import zoo.moe.lowrank as lowrank
from zoo.moe import LoRAExperts, MoEConfig, MoELayer, loop_dispatch

D, H, E, R = 16, 24, 4, 2  # D and H multiples of 4: fp32 rows 16-byte aligned, as torch._grouped_mm needs


def _experts(per_expert_base: bool, activation: str = "swiglu", bias: bool = False, seed: int = 0) -> LoRAExperts:
    """LoRA experts with random bases and factors (``lora_b1`` random outside its SwiGLU block mask too, so a
    missing mask shows) and a scale != 1 (so a missing scale shows)."""
    torch.manual_seed(seed)
    ex = LoRAExperts(E, D, H, activation, bias=bias, r=R, alpha=3.0, per_expert_base=per_expert_base)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.3)
    return ex


def _routing(T: int, K: int, drop: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    top, ei = torch.topk(logits, K, dim=-1)
    cw = torch.softmax(top, dim=-1).requires_grad_(True)
    keep = torch.ones(T, K, dtype=torch.bool)
    if drop:  # capacity: some slots dropped, one of them with an out-of-range index (as a masked slot may carry)
        keep = torch.rand(T, K, generator=g) > 0.3
        ei = ei.clone()
        idx = (~keep).nonzero()[0]
        ei[idx[0], idx[1]] = E
    return ei, cw, keep


def _grads(ex, x, cw):
    return [p.grad.clone() for p in ex.lora_parameters()] + [x.grad.clone(), cw.grad.clone()]


def _grouped_mm_works() -> bool:
    try:
        a, w = torch.randn(6, 8), torch.randn(2, 8, 4)
        return bool(torch.allclose(torch._grouped_mm(a, w, offs=torch.tensor([2, 6], dtype=torch.int32)),
                                   torch.cat([a[:2] @ w[0], a[2:] @ w[1]])))
    except Exception:  # noqa: BLE001 - not on this torch / device
        return False


GROUPED = [False] + ([True] if _grouped_mm_works() else [])


BASES = [(per_expert, act, bias, gmm) for act, bias in (("swiglu", False), ("gelu", True))
         for per_expert, gmm in [(True, g) for g in GROUPED] + [(False, False)]]  # a shared base: dense GEMMs


@pytest.mark.parametrize("drop", [False, True], ids=["dropless", "capacity"])
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("per_expert_base,activation,bias,grouped_mm", BASES)
def test_lowrank_equals_merged_reference_outputs_and_gradients(per_expert_base, activation, bias, grouped_mm, K,
                                                                drop):
    ex = _experts(per_expert_base, activation, bias)
    T = 23
    ei, cw, keep = _routing(T, K, drop)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2), requires_grad=True)
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(3))

    y = lowrank.lowrank_moe(ex, x, ei, cw, keep, grouped_mm=grouped_mm)
    y.backward(dy)
    got = _grads(ex, x, cw)
    for t in (*ex.lora_parameters(), x, cw):
        t.grad = None
    want_y = loop_dispatch(x, ei, cw, keep, ex.stacked())  # merged weights, the per-expert loop: the reference
    want_y.backward(dy)
    want = _grads(ex, x, cw)
    assert not torch.allclose(want_y, torch.zeros_like(want_y))
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("lora_a1", "lora_b1", "lora_a2", "lora_b2", "x", "combine_weight"), got, want):
        assert w.abs().max() > 0, name
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert ex.w1.grad is None and ex.w2.grad is None  # the base stays frozen


def _layer(per_expert_base: bool, K: int, drop: bool, dispatch: str = "auto") -> MoELayer:
    cfg = MoEConfig(num_experts=E, top_k=K, activation="swiglu", expert_bias=False, noise_std=0.0, group_size=2,
                    dropless=not drop, capacity_factor=0.6 if drop else 1.0, dispatch=dispatch)
    torch.manual_seed(5)
    layer = MoELayer(D, H, cfg, experts=_experts(per_expert_base))
    with torch.no_grad():
        layer.router.proj.weight.normal_(0, 0.5)
    return layer


class _Spy:
    def __init__(self, monkeypatch):
        self.lowrank = self.stacked = 0
        real_lowrank, real_stacked = lowrank.lowrank_moe, LoRAExperts.stacked

        def spy_lowrank(*a, **k):
            self.lowrank += 1
            return real_lowrank(*a, **k)

        def spy_stacked(ex):
            self.stacked += 1
            return real_stacked(ex)

        monkeypatch.setattr(lowrank, "lowrank_moe", spy_lowrank)
        monkeypatch.setattr(LoRAExperts, "stacked", spy_stacked)


@pytest.mark.parametrize("drop", [False, True], ids=["dropless", "capacity"])
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("per_expert_base", [True, False], ids=["per_expert_base", "shared_base"])
def test_layer_trains_through_lowrank_path_and_matches_the_reference(per_expert_base, K, drop, monkeypatch):
    """A training step of MoELayer takes the low-rank path (no merge: stacked() is never called) and equals the
    plain-PyTorch reference (dispatch="loop", the per-expert loop of LoRAExperts.expert) in the output and the
    gradients of the LoRA factors, the router and the input; eval under no_grad serves merged weights instead."""
    layer, ref = _layer(per_expert_base, K, drop), _layer(per_expert_base, K, drop, dispatch="loop")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 6, D, generator=torch.Generator().manual_seed(7))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    spy = _Spy(monkeypatch)
    ya = layer(xa)
    assert (spy.lowrank, spy.stacked) == (1, 0)
    yb = ref(xb)
    assert (spy.lowrank, spy.stacked) == (1, 0)  # the reference dispatcher never asks for either
    if drop:
        assert (yb == 0).all(dim=-1).any(), "capacity should drop some token entirely"
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(ya)
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    names = ("router.proj.weight", "experts.lora_a1", "experts.lora_b1", "experts.lora_a2", "experts.lora_b2")
    pa, pb = dict(layer.named_parameters()), dict(ref.named_parameters())
    for n in names:
        assert pb[n].grad.abs().max() > 0, n
        torch.testing.assert_close(pa[n].grad, pb[n].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    assert layer.experts.w1.grad is None

    layer.eval()
    with torch.no_grad():
        layer(x)
    assert spy.lowrank == 1 and spy.stacked == 1  # inference: the merged weights (fused path where it runs)


def test_lowrank_path_choice(monkeypatch):
    """Taken only while a factor trains with autograd on and the base frozen."""
    ex = _experts(True)
    assert ex.lowrank_active() and ex.routed_path() is not None
    with torch.no_grad():
        assert not ex.lowrank_active() and ex.routed_path() is None
    with torch.inference_mode():
        assert ex.routed_path() is None
    ex.requires_grad_(False)  # frozen factors: merged weights (gradients to the input only)
    assert ex.routed_path() is None
    ex.lora_b2.requires_grad_(True)
    assert ex.routed_path() is not None
    ex.w1.requires_grad_(True)  # a base that trains needs its weight gradients: the differentiable merge
    assert ex.routed_path() is None
    layer = _layer(True, 2, False, dispatch="sorted")  # the reference dispatchers ignore the experts' own path
    spy = _Spy(monkeypatch)
    layer(torch.randn(2, 3, D)).sum().backward()
    assert spy.lowrank == 0


def test_grouped_mm_choice_is_explicit(monkeypatch):
    """torch._grouped_mm where the fused path's grouped_mm backend runs (CUDA bf16 sm90+), else the per-expert
    loop; grouped_mm=None decides by that, True / False force it."""
    x = torch.randn(5, D)
    assert lowrank.grouped_mm_usable(x) is False  # CPU (and CPU fp32): the loop
    calls = []
    real = getattr(torch, "_grouped_mm", None)

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch, "_grouped_mm", spy, raising=False)
    ex = _experts(True)
    ei, cw, keep = _routing(5, 2, False)
    y_loop = lowrank.lowrank_moe(ex, x, ei, cw, keep)
    assert calls == []
    monkeypatch.setattr(lowrank, "grouped_mm_usable", lambda x: True)
    if real is None or not _grouped_mm_works():
        pytest.skip("torch._grouped_mm does not run here")
    calls.clear()
    y_grouped = lowrank.lowrank_moe(ex, x, ei, cw, keep)
    assert len(calls) == 2  # one per layer
    torch.testing.assert_close(y_grouped, y_loop, rtol=1e-5, atol=1e-6)


def test_eval_merge_is_cached_while_the_factors_do_not_change():
    ex = _experts(False).eval()
    with torch.no_grad():
        assert ex.stacked() is not ex.stacked() and ex._merge_cache is None  # opt-in: off by default
    ex.cache_merge = True
    with torch.no_grad():
        a = ex.stacked()
        assert ex.stacked() is a  # nothing changed: the same merge
        ex.lora_b2.add_(1.0)  # in place (an optimizer step): the version counter moves
        b = ex.stacked()
    assert b is not a and not torch.allclose(b.w2, a.w2)
    torch.testing.assert_close(b.w2, ex._merge().w2.detach())
    with torch.no_grad():
        ex.load_state_dict({k: v + 1 for k, v in ex.state_dict().items()})
        c = ex.stacked()
        assert c is not b
        torch.testing.assert_close(c.w1, ex._merge().w1)
    sw = ex.stacked()  # grad enabled and the factors require grad: the differentiable merge, never cached
    assert sw.w1.requires_grad and ex._merge_cache is None
    with torch.no_grad():
        ex.stacked()
        assert ex._merge_cache is not None
        ex.train()
        assert ex._merge_cache is None
        ex.stacked()  # training mode: no cache
        assert ex._merge_cache is None
        ex.eval()
        d = ex.stacked()
        ex.double()
        assert ex._merge_cache is None and ex.stacked().w1.dtype == torch.float64 and d.w1.dtype == torch.float32
    import copy

    assert copy.deepcopy(ex)._merge_cache is None


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("per_expert_base", [True, False], ids=["per_expert_base", "shared_base"])
def test_layer_lowrank_on_cuda_bf16_with_compiled_routing(per_expert_base, monkeypatch):
    """On the GPU in bf16, two training steps of MoELayer with the default settings (routing compiled and replayed
    as a CUDA graph) take the low-rank path (torch._grouped_mm for a per-expert base on sm90+) outside the graph,
    never merge, and match the same layer on the plain-PyTorch loop (same compiled routing) within bf16
    tolerance."""
    import copy
    import dataclasses

    dev, Dc, Hc = torch.device("cuda"), 64, 96
    cfg = MoEConfig(num_experts=E, top_k=2, activation="swiglu", expert_bias=False, noise_std=0.0, group_size=2,
                    dropless=True)
    torch.manual_seed(0)
    ex = LoRAExperts(E, Dc, Hc, "swiglu", r=8, alpha=16.0, per_expert_base=per_expert_base)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, Dc ** -0.5)
    layer = MoELayer(Dc, Hc, cfg, experts=ex).to(dev, torch.bfloat16)
    ref = copy.deepcopy(layer)
    ref.config = dataclasses.replace(ref.config, dispatch="loop")
    spy = _Spy(monkeypatch)
    calls, real = [], getattr(torch, "_grouped_mm", None)
    if real is not None:
        monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    for step in range(2):
        x = torch.randn(4, 32, Dc, device=dev, dtype=torch.bfloat16)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = layer(xa), ref(xb)
        dy = torch.randn_like(ya)
        (ya.float() * dy.float()).sum().backward()
        (yb.float() * dy.float()).sum().backward()
        assert _rel(ya, yb) < 3e-2, step
        pa, pb = dict(layer.named_parameters()), dict(ref.named_parameters())
        for n in ("router.proj.weight", "experts.lora_a1", "experts.lora_b1", "experts.lora_a2", "experts.lora_b2"):
            assert _rel(pa[n].grad, pb[n].grad) < 6e-2, (step, n)
        assert _rel(xa.grad, xb.grad) < 6e-2, step
        layer.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    assert spy.lowrank == 2 and spy.stacked == 0
    if per_expert_base and lowrank.grouped_mm_usable(x):
        assert len(calls) >= 2


def test_traces_as_one_graph_builds_no_weights(monkeypatch):
    """``MoELayer.traces_as_one_graph`` (asked each training step by a compiled decoder) agrees with the layer's own
    choice of path, and answers without merging LoRA experts' weights (``stacked()``: a merge per call)."""
    import zoo.moe.layer as layer_module

    layer = _layer(False, 2, False).train()
    layer.experts.requires_grad_(False)  # frozen factors: the merged weights would serve the fused kernel
    x = torch.randn(2, 3, D)
    merges = []
    monkeypatch.setattr(LoRAExperts, "stacked", lambda self: merges.append(1))
    assert layer.traces_as_one_graph(x) is False and merges == []  # CPU: a reference dispatcher
    monkeypatch.setattr(layer_module, "_fused_moe_or_none", lambda x, activation: object())  # as on a GPU
    assert layer.traces_as_one_graph(x) is True and merges == []
    layer.experts.lora_b2.requires_grad_(True)  # a training factor: the experts' own low-rank path, outside graphs
    assert layer.traces_as_one_graph(x) is False
    layer.config.dispatch = "sorted"
    layer.experts.requires_grad_(False)
    assert layer.traces_as_one_graph(x) is False
