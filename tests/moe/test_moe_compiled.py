"""``compile_routing``: the router decision and the aux losses / statistics as ``torch.compile`` graphs give the
same outputs, losses, statistics and gradients as the eager reference (CPU here; CUDA compiles them by default)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from zoo.moe import MoEConfig, MoELayer
from zoo.moe.compiled import compile_enabled, maybe_compiled
from zoo.moe.stats import sparse_aux
from zoo.moe.routing import topk_route

CASES = {
    # V-MoE: noisy top-2, batch priority, capacity 1.05, importance + load losses, no mask (the all-valid path).
    "vmoe": (dict(num_experts=4, top_k=2, group_size=2), False, False),
    # LIMoE / LLM text: padding mask, modality ids, entropy losses per modality, capacity from the valid tokens,
    # renormalised weights, token order.
    "masked_modalities": (dict(num_experts=4, top_k=1, group_size=None, num_modalities=2, renormalize=True,
                               batch_priority=False, capacity_from_valid_tokens=True, local_entropy_weight=0.1,
                               global_entropy_weight=0.2, global_entropy_min_experts=2.0, z_loss_weight=1e-3,
                               # Uni-MoE v2's target-expert and cross-modality KL losses
                               target_expert_loss_weight=0.05, target_experts_by_modality=((), (0, 1)),
                               cross_modality_kl_weight=0.05),
                          True, True),
    # MoE-LLaVA's DeepSpeed top-2 gating: Gumbel-sampled 2nd expert (drawn outside the graph), whole-call capacity,
    # gates renormalised after dropping, padding mask.
    "deepspeed_gumbel": (dict(num_experts=4, top_k=2, group_size=None, noise_std=0.0, renormalize=True,
                              batch_priority=False, capacity_multiple_of=1, capacity_factor=0.5, min_capacity=2,
                              deepspeed_top2_gating="gumbel", switch_loss_weight=0.01, z_loss_weight=1e-3),
                         True, False),
}


def _run(layer: MoELayer, x: torch.Tensor, mask, modality, seed: int):
    layer.zero_grad(set_to_none=True)
    layer.router.generator = torch.Generator().manual_seed(seed)
    x = x.clone().requires_grad_(True)
    y = layer(x, mask=mask, modality=modality)
    aux = layer.aux
    (y.square().sum() + aux.loss).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), aux, x.grad, grads


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_routing_matches_eager(case, monkeypatch):
    import zoo.moe.compiled as compiled_mod

    kwargs, masked, with_modality = CASES[case]
    # A fresh dynamo cache and a fresh table of the layer's compiled functions: the graph count below is this case's
    # alone. Without them, a case ran eagerly in a process where (a) an earlier case's compile had failed in the
    # backend (the layer then runs that function eagerly for the rest of the process: on the GPU host, after
    # "deepspeed_gumbel" skipped for torch 2.11's CPU inductor bug, "masked_modalities" and "vmoe" in the same pytest
    # worker counted 0 graphs, sessions 13 and 14), or (b) dynamo's recompile limit had been reached.
    torch._dynamo.reset()
    monkeypatch.setattr(compiled_mod, "_COMPILED", {})
    torch.manual_seed(0)
    eager = MoELayer(16, 24, MoEConfig(**kwargs, compile_routing=False)).train()
    compiled = MoELayer(16, 24, MoEConfig(**kwargs, compile_routing=True)).train()
    compiled.load_state_dict(eager.state_dict())
    B, S = 4, 10
    x = torch.randn(B, S, 16)
    mask = torch.rand(B, S) > 0.3 if masked else None
    modality = (torch.arange(S) >= 6).long().expand(B, S).contiguous() if with_modality else None
    calls, ref_calls = [], []
    compiled.router.register_forward_hook(lambda mod, args, out: calls.append(out))  # hooks still see the Routing
    eager.router.register_forward_hook(lambda mod, args, out: ref_calls.append(out))
    torch._dynamo.utils.counters.clear()
    for seed in (1, 2):  # a second call reuses the compiled graphs
        ref = _run(eager, x, mask, modality, seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _run(compiled, x, mask, modality, seed)
        if any("failed in the compiler backend" in str(w.message) for w in caught):
            # torch 2.11's inductor on an AVX-512 host failed to build one CPU kernel of this case: the layer ran
            # eagerly (test_a_compiler_backend_failure_falls_back_to_eager); there is no compiled path to compare
            pytest.skip(f"torch {torch.__version__}: the compiler backend failed on this host; the layer fell back "
                        "to eager")
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1].loss, ref[1].loss, rtol=1e-5, atol=1e-7)
        assert got[1].losses.keys() == ref[1].losses.keys() and len(ref[1].losses) >= 2
        for name in ref[1].losses:
            torch.testing.assert_close(got[1].losses[name], ref[1].losses[name], rtol=1e-5, atol=1e-7)
        for field in dataclasses.fields(ref[1].stats):
            a, b = getattr(got[1].stats, field.name), getattr(ref[1].stats, field.name)
            if isinstance(b, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=field.name)
            else:
                assert a == b, field.name
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)
        assert got[3].keys() == ref[3].keys() and "router.proj.weight" in ref[3]
        for name in ref[3]:
            torch.testing.assert_close(got[3][name], ref[3][name], rtol=1e-4, atol=1e-6, msg=name)
    assert len(calls) == len(ref_calls) == 2
    # A compiled output that requires grad but gets none costs a zero-filled tangent in every backward: the Routing
    # comes back detached; only what the layer differentiates, the combine weights (to the dispatcher) and the
    # weighted aux loss, requires grad.
    needs_grad = {f.name for f in dataclasses.fields(calls[-1])
                  if isinstance(getattr(calls[-1], f.name), torch.Tensor) and getattr(calls[-1], f.name).requires_grad}
    assert needs_grad == set()
    # The aux and the combine weights now come from the layer's graph (routed_moe), not through Routing.aux: the
    # combine weights' gradient reaches the router (router.proj.weight's gradient is compared above).
    aux = compiled.aux
    assert aux.loss.requires_grad
    assert not any(v.requires_grad for v in aux.losses.values())
    assert not any(getattr(aux.stats, f.name).requires_grad for f in dataclasses.fields(aux.stats)
                   if isinstance(getattr(aux.stats, f.name), torch.Tensor))
    for got_r, ref_r in zip(calls, ref_calls):
        for name in ("expert_index", "keep", "position", "expert_demand"):
            assert torch.equal(getattr(got_r, name), getattr(ref_r, name)), name
    # The decision, losses and statistics compiled to one graph (no graph break), and the second call recompiled
    # nothing.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    if masked:  # padding took no capacity and got no weight
        assert not calls[-1].keep[~mask.reshape(1, -1)].any()


def test_compile_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compile_enabled(None, cpu) and compile_enabled(None, cuda)
    assert compile_enabled(True, cpu) and not compile_enabled(False, cuda)
    assert maybe_compiled(topk_route, False, cpu) is topk_route
    assert maybe_compiled(sparse_aux, None, cpu) is sparse_aux
    compiled = maybe_compiled(topk_route, True, cpu)
    assert compiled is not topk_route and maybe_compiled(topk_route, True, cuda) is compiled  # one per function
    with torch.no_grad():  # evaluation runs eagerly
        assert maybe_compiled(topk_route, True, cpu) is topk_route


@torch._dynamo.config.patch(recompile_limit=1)
def test_recompile_limit_falls_back_to_eager():
    """Past dynamo's recompilation limit the layer keeps training eagerly (same numbers) instead of failing, as a
    LIMoE run alternating image / text shapes would otherwise do."""
    # (dynamo's own config.patch, not pytest's monkeypatch: pytest 9.2's monkeypatch DELETES a config entry of
    # torch's config modules on undo, which broke every later test that reads it)
    torch._dynamo.reset()
    kwargs = dict(num_experts=4, top_k=2, group_size=None)
    torch.manual_seed(0)
    eager = MoELayer(8, 12, MoEConfig(**kwargs, compile_routing=False)).train()
    compiled = MoELayer(8, 12, MoEConfig(**kwargs, compile_routing=True)).train()
    compiled.load_state_dict(eager.state_dict())
    for step, (B, S, masked) in enumerate([(2, 6, False), (3, 5, True), (2, 7, True), (4, 6, False)]):
        x = torch.randn(B, S, 8)
        mask = torch.rand(B, S) > 0.3 if masked else None
        ref = _run(eager, x, mask, None, step)
        got = _run(compiled, x, mask, None, step)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1].loss, ref[1].loss, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


def test_grads_are_copied_when_adopted_and_added_otherwise():
    """keep_grads_out_of_graph_pool: the gradient autograd would adopt as ``.grad`` (a CUDA graph pool tensor under
    cuda_graphs, reused by the next step) is a copy; later gradients are added to it; one hook per parameter."""
    from zoo.moe.compiled import keep_grads_out_of_graph_pool

    w = torch.nn.Parameter(torch.randn(3, 4))
    incoming = []  # (address, values): holding the tensor itself would stop autograd from adopting it
    w.register_hook(lambda g: incoming.append((g.data_ptr(), g.detach().clone())))  # sees what the graph returns
    keep_grads_out_of_graph_pool([w, None])
    keep_grads_out_of_graph_pool([w])  # a second registration would copy twice: there is one hook
    x = torch.randn(5, 3)
    (x @ w).sum().backward()
    assert w.grad.data_ptr() != incoming[0][0]
    torch.testing.assert_close(w.grad, incoming[0][1])
    first = w.grad
    (x @ w).square().sum().backward()
    assert w.grad is first  # added in place, no copy
    torch.testing.assert_close(w.grad, incoming[0][1] + incoming[1][1])
    assert len(w._backward_hooks) == 2


def test_checkpointed_decoder_blocks_run_without_cuda_graphs(monkeypatch):
    """Activation checkpointing runs a block twice per step (forward, recompute in backward); CUDA graph trees fail
    on that ("graph recording observed an input tensor deallocate"), so both calls of a checkpointed MoE layer must
    see CUDA graphs off, and one run without checkpointing must not. (Dense blocks replay no graphs of their own and
    do not enter the context: a compiled stack could not trace it.)"""
    import zoo
    from zoo.moe import compiled

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda = torch.device("cuda")
    assert compiled.cuda_graphs_enabled(None, cuda)
    with compiled.cuda_graphs_off():
        assert not compiled.cuda_graphs_enabled(None, cuda) and not compiled.cuda_graphs_enabled(True, cuda)
    assert compiled.cuda_graphs_enabled(None, cuda)

    model = zoo.create_model("decoder_tiny_moe")
    seen = []
    moe_layers = [block.mlp for block in model.blocks if block.moe_position]
    for layer in moe_layers:
        layer.register_forward_pre_hook(lambda m, a: seen.append(compiled.cuda_graphs_enabled(None, cuda)))
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    model.train()
    model.gradient_checkpointing = True
    model(ids).logits.sum().backward()
    assert len(seen) == 2 * len(moe_layers) > 0 and not any(seen)  # forward + recompute, graphs off in both
    seen.clear()
    model.gradient_checkpointing = False
    model(ids).logits.sum().backward()
    assert len(seen) == len(moe_layers) and all(seen)


def test_a_compiler_backend_failure_falls_back_to_eager(monkeypatch):
    """torch 2.11's inductor once emitted C++ that did not build for one routing kernel on an AVX-512 host (GPU
    machine, CPU tensors): the layer must warn and go on eagerly with the same values, not end the run."""
    import zoo.moe.compiled as compiled_mod
    from torch._dynamo.exc import BackendCompilerFailed

    attempts = []

    def broken_compile(fn, mode=None):
        def run(*args):
            attempts.append(fn)
            raise BackendCompilerFailed(lambda *a: None, RuntimeError("C++ compile error: 'tmp8' was not declared"),
                                        None)
        return run

    monkeypatch.setattr(compiled_mod, "_COMPILED", {})
    monkeypatch.setattr(compiled_mod.torch, "compile", broken_compile)
    kwargs, masked, with_modality = CASES["deepspeed_gumbel"]
    torch.manual_seed(0)
    eager = MoELayer(16, 24, MoEConfig(**kwargs, compile_routing=False)).train()
    fallback = MoELayer(16, 24, MoEConfig(**kwargs, compile_routing=True)).train()
    fallback.load_state_dict(eager.state_dict())
    x = torch.randn(4, 10, 16)
    with pytest.warns(RuntimeWarning, match="failed in the compiler backend.*eagerly"):
        got = _run(fallback, x, None, None, 1)
    assert len(attempts) >= 1
    tried = len(attempts)
    ref = _run(eager, x, None, None, 1)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[2], ref[2])
    again = _run(fallback, x, None, None, 2)  # later calls go straight to eager: the compiler is not retried
    assert len(attempts) == tried
    torch.testing.assert_close(again[0], _run(eager, x, None, None, 2)[0])


def test_compiled_once_is_one_shared_function_and_falls_back_to_eager(monkeypatch):
    """compiled_once (the decoder's compiled blocks, the compiled tower): one compiled function per function for the
    whole process, and on a compiler-backend failure a warning naming the option to turn off, then ``fn`` itself."""
    import zoo.moe.compiled as compiled_mod
    from torch._dynamo.exc import BackendCompilerFailed

    built = []

    def broken_compile(fn, mode=None):
        built.append((fn, mode))

        def run(*args):
            raise BackendCompilerFailed(lambda *a: None, RuntimeError("C++ compile error"), None)
        return run

    monkeypatch.setattr(compiled_mod, "_COMPILED", {})
    monkeypatch.setattr(compiled_mod.torch, "compile", broken_compile)

    def double(x):
        return 2 * x

    once = compiled_mod.compiled_once(double)
    assert compiled_mod.compiled_once(double) is once and built == [(double, None)]
    with pytest.warns(RuntimeWarning, match="failed in the compiler backend.*compile=False"):
        assert once(torch.ones(2)).tolist() == [2.0, 2.0]
    assert compiled_mod.compiled_once(double) is double  # from then on, the function itself
