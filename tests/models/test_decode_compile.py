"""The compiled decode step (zoo/models/generate.py: compiled_decode_step, generate(compile=True)) on the CPU: same
logits and KV cache as the eager step, one graph without breaks (MoE layers included), no recompilation from step
to step, and the same greedy tokens as eager generation.

Inductor compiles C++ on the CPU (seconds per graph), so the models are 2 blocks deep and each test compiles once or
twice; every test starts from an empty dynamo cache so its compile counts are its own."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._dynamo.utils import counters

from tests.models.test_decoder import MOE, tiny
from zoo.models.generate import compiled_decode_step, generate
from zoo.moe import MoELayer
from zoo.moe.layer import routing_statistics_off


def moe_decoder():
    """Top-2 of 4 experts in both blocks (tied embeddings, SwiGLU experts)."""
    return tiny("tied_sparse_moe", depth=2, moe_placement="all")


def left_padded(B: int = 2, S: int = 6, seed: int = 3):
    torch.manual_seed(seed)
    ids = torch.randint(1, 61, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :3] = 0  # the second prompt is 3 tokens, left-padded
    return ids * mask, mask


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_moe_decode_step_traces_as_one_graph():
    """No graph break in a decode step of an MoE decoder (eval): on the CPU the layer's experts run through the
    dense dispatcher while traced (the sorted one's host-side row counts would break the graph)."""
    model = moe_decoder()
    ids, mask = left_padded()
    with torch.no_grad():
        cache = model.new_cache(2, 10)
        model(ids, mask, cache=cache)
        explained = torch._dynamo.explain(lambda t, c: model(t, cache=c).logits)(ids[:, -1:], cache)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("variant", ["moe", "phi_parallel"])
def test_compiled_step_matches_eager_and_does_not_recompile(variant):
    model = moe_decoder() if variant == "moe" else tiny("phi_parallel", depth=2)
    step = compiled_decode_step(model)
    ids, mask = left_padded()
    steps = 5
    # dynamo's own config.patch, not pytest's monkeypatch: pytest 9.2's monkeypatch DELETES a config entry of torch's
    # config modules on undo, which broke every later test that reads it
    with torch.no_grad(), contextlib.ExitStack() as strict:
        eager_cache, compiled_cache = model.new_cache(2, 6 + steps), model.new_cache(2, 6 + steps)
        model(ids, mask, cache=eager_cache)
        model(ids, mask, cache=compiled_cache)
        token = ids[:, -1:]
        for i in range(steps):
            eager = model(token, cache=eager_cache).logits
            compiled = step(token, compiled_cache)
            assert compiled.shape == (2, 1, 61)
            torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
            if i == 0:
                frames = counters["stats"]["unique_graphs"]
                assert frames == 1  # one graph for the whole step
                # every later step must reuse it: a recompilation now raises instead of passing silently
                strict.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
            token = eager[:, -1:].argmax(-1)
        assert counters["stats"]["unique_graphs"] == frames
        # the cache: same tensors written the same way, host and device slot counters advanced together
        for name in ("keys", "values"):
            torch.testing.assert_close(getattr(compiled_cache, name), getattr(eager_cache, name), atol=1e-5, rtol=0)
        for name in ("key_valid", "num_real", "next_slot"):
            assert torch.equal(getattr(compiled_cache, name), getattr(eager_cache, name)), name
        assert compiled_cache.length == eager_cache.length == 6 + steps
        # a fresh cache of the same shape (the next generation) reuses the graph too
        fresh_eager, fresh_compiled = model.new_cache(2, 6 + steps), model.new_cache(2, 6 + steps)
        model(ids, mask, cache=fresh_eager)
        model(ids, mask, cache=fresh_compiled)
        torch.testing.assert_close(step(ids[:, -1:], fresh_compiled), model(ids[:, -1:], cache=fresh_eager).logits,
                                   atol=1e-5, rtol=0)
        assert counters["stats"]["unique_graphs"] == frames
        # and the cache bound is checked on the host, before the compiled region
        with pytest.raises(ValueError, match="does not fit in the KV cache"):
            step(token, compiled_cache)


def test_compiled_prefill_matches_eager_then_decodes_on():
    """``CompiledDecodeStep.prefill``: a prompt through the same compiled function (what benchmarks/generate.py's
    "zoo + compile" rows time for prefill) gives the eager logits and leaves the cache where eager prefill does."""
    model = moe_decoder()
    torch.manual_seed(5)
    ids = torch.randint(1, 61, (2, 6))
    step = compiled_decode_step(model)
    with torch.no_grad():
        ref_cache, cache = model.new_cache(2, 9), model.new_cache(2, 9)
        ref = model(ids, cache=ref_cache).logits
        got = step.prefill(ids, cache)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        assert cache.length == ref_cache.length == 6 and int(cache.next_slot) == 6
        token = ref[:, -1:].argmax(-1)
        torch.testing.assert_close(step(token, cache), model(token, cache=ref_cache).logits, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="do not fit in the KV cache"):
            step.prefill(ids, cache)


def test_greedy_generate_with_compile_gives_the_eager_tokens():
    """generate(compile=True): left-padded batch of 2, MoE decoder; the compiled step is kept per model, so a
    second call compiles nothing."""
    model = moe_decoder()
    ids, mask = left_padded()
    eager = generate(model, ids, mask, max_new_tokens=6)
    compiled = generate(model, ids, mask, max_new_tokens=6, compile=True)
    assert compiled.shape == (2, 12) and torch.equal(compiled, eager)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(model.generate(ids, mask, max_new_tokens=6, compile=True), eager)
    assert counters["stats"]["unique_graphs"] == graphs


def test_generate_with_compile_from_embeddings_and_modality():
    """A multimodal prompt (inputs_embeds with modality ids for the routers): the compiled steps, which get text
    modality ids, give the eager tokens."""
    model = tiny("tied_sparse_moe", depth=2, moe_placement="all", moe=dict(MOE, num_modalities=2))
    torch.manual_seed(0)
    embeds = torch.randn(2, 5, 32)
    modality = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 0, 0]])
    eager = generate(model, inputs_embeds=embeds, modality=modality, max_new_tokens=5)
    compiled = generate(model, inputs_embeds=embeds, modality=modality, max_new_tokens=5, compile=True)
    assert compiled.shape == (2, 5) and torch.equal(compiled, eager)


def test_compiled_step_keeps_routing_statistics_switch():
    """The MoE statistics switch (routing_statistics_off, a context variable) is honoured by the compiled step:
    statistics computed when on, none when off (a guard recompiles rather than replaying the other choice)."""
    model = moe_decoder()
    step = compiled_decode_step(model)
    ids, mask = left_padded()
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    with torch.no_grad():
        cache = model.new_cache(2, 8)
        model(ids, mask, cache=cache)
        step(ids[:, -1:], cache)
        assert all(layer.aux is not None and layer.aux.stats is not None for layer in layers)
        eager_cache = model.new_cache(2, 8)
        model(ids, mask, cache=eager_cache)
        model(ids[:, -1:], cache=eager_cache)
        expected = [layer.aux.stats.tokens_per_expert.clone() for layer in layers]
        with routing_statistics_off():
            step(ids[:, -1:], cache)
        assert all(layer.aux is None for layer in layers)
    # the statistics of the compiled step were those of the eager step
    cache = model.new_cache(2, 8)
    with torch.no_grad():
        model(ids, mask, cache=cache)
        step(ids[:, -1:], cache)
    for layer, want in zip(layers, expected):
        torch.testing.assert_close(layer.aux.stats.tokens_per_expert, want)


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu_tanh", True)])
def test_dense_dispatch_equals_the_reference_dispatchers(activation, bias):
    """The traced-inference dispatcher (every expert on every token, then a gather) gives loop_dispatch's output,
    dropped slots (keep False) and out-of-range expert ids included, in fp64."""
    from zoo.moe import StackedExperts, loop_dispatch, sorted_dispatch
    from zoo.moe.dispatch import dense_dispatch

    torch.manual_seed(0)
    E, D, H, T, K = 4, 8, 12, 7, 2
    experts = StackedExperts(E, D, H, activation, bias).double()
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(T, D, dtype=torch.float64)
    expert_index = torch.randint(0, E, (T, K))
    expert_index[2, 1] = E  # out of range: dropped like by the fused kernel and loop_dispatch
    combine = torch.rand(T, K, dtype=torch.float64)
    keep = torch.rand(T, K) > 0.3
    keep[2, 1] = True
    want = loop_dispatch(x, expert_index, combine, keep, experts)
    torch.testing.assert_close(dense_dispatch(x, expert_index, combine, keep, experts), want)
    in_range = keep & (expert_index < E)
    torch.testing.assert_close(sorted_dispatch(x, expert_index, combine, in_range, experts), want)


def test_no_context_variable_is_read_in_code_a_decode_step_traces():
    """torch 2.11's dynamo cannot trace ``ContextVar.get``: the routing-statistics switch was one, read in every MoE
    layer, and on the H200 (torch 2.11) the compiled Phi-2x4 step broke its graph there, recompiled per block and ran
    24 of 32 blocks eagerly (0.72x of the hoped-for speed-up; the torch of CI traces ContextVar, so the graph test
    above did not see it). Code that runs inside a compiled step reads plain globals instead. ``zoo/moe/compiled.py``
    reads its ContextVar only outside compiled code (when deciding whether to compile)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "zoo"
    traced = [*(root / "layers").glob("*.py"), *(root / "moe").glob("*.py"), *(root / "kernels").glob("*.py"),
              root / "models" / "decoder.py", root / "models" / "generate.py"]
    offenders = [str(p.relative_to(root.parent)) for p in traced
                 if p.name != "compiled.py" and re.search(r"^\s*(import|from) contextvars", p.read_text(), re.M)]
    assert not offenders, offenders
