"""benchmarks/moe_peers.py: the dispatch + combine timers of benchmarks/moe_layer.py compute what they claim.

Ours runs the fused path's own Triton launchers: on CPU under TRITON_INTERPRET=1 in a subprocess (Triton decides
at import time whether kernels are interpreted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, "benchmarks")
import moe_peers as P
from zoo.moe.routing import compute_capacity
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
G, S, E, K, D = 3, 16, 4, 2, 8
T = G * S
C = compute_capacity(S, E, K, 1.05, 1)
x = torch.randn(T, D, device=dev)
ei = torch.randint(0, E, (T, K), device=dev)
cw = torch.rand(T, K, device=dev)
keep = torch.zeros(T, K, dtype=torch.bool)
for g in range(G):  # the capacity rule in k-major token order, C slots per expert and group
    used = [0] * E
    for k in range(K):
        for s in range(S):
            e = int(ei[g * S + s, k])
            if used[e] < C:
                keep[g * S + s, k], used[e] = True, used[e] + 1
keep = keep.to(dev)
ref = ((cw * keep)[..., None] * x[:, None, :]).sum(1)
err = {name: float((fn(x, ei, cw, keep, E) - ref).abs().max())
       for name, fn in (("ours", P.ours_dispatch_combine()), ("einsum", P.einsum_dispatch_combine(G, S, C)))}
print(json.dumps(dict(err, dropped=int((~keep).sum()))))
"""


def test_dispatch_combine_timers_compute_the_weighted_sum_of_kept_slots():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["dropped"] > 0  # the capacity dropped some slots, so keep matters
    assert res["ours"] < 1e-5 and res["einsum"] < 1e-5, res


def _ds_peer():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import moe_peers

    return moe_peers


def _top2_layer():
    """A dropless renormalised top-2 SwiGLU layer (MoE-LLaVA's routing), seeded: [E=4] experts of 8 -> 16 -> 8."""
    import torch

    from zoo.moe import MoEConfig, MoELayer

    torch.manual_seed(0)
    return MoELayer(8, 16, MoEConfig(num_experts=4, top_k=2, renormalize=True, dropless=True, group_size=None,
                                     activation="swiglu", expert_bias=False)).eval()


def test_deepspeed_peer_equals_the_zoo_layer_when_nothing_is_dropped():
    """The MoE-LLaVA benchmark peer (DeepSpeed 0.9.5's top-2 gating + einsum dispatch) computes the same function
    as the zoo layer with renormalised top-2 routing when its capacity keeps every token."""
    import torch

    P = _ds_peer()
    layer = _top2_layer()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(std=0.3)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        want = layer(x)
        got = P.DeepSpeedTop2MoE(layer, capacity_factor=4.0)(x)
    assert (want - got).abs().max() <= 1e-5


def test_deepspeed_peer_capacity_rule_queues_second_choices_after_all_first_choices():
    import torch

    from zoo.moe import MoEConfig, MoELayer

    P = _ds_peer()
    layer = MoELayer(2, 4, MoEConfig(num_experts=2, top_k=2, renormalize=True, dropless=True, group_size=None))
    with torch.no_grad():  # router = identity: expert 0 first when x[0] > x[1]
        layer.router.proj.weight.copy_(torch.eye(2))
    peer = P.DeepSpeedTop2MoE(layer, capacity_factor=0.25, min_capacity=1)  # C = ceil(4 / 2 * 0.25 * 2) = 1
    captured = {}

    class Spy(torch.nn.Module):
        def expert(self, e, buf):
            captured[e] = buf.clone()
            return buf * 0

    peer.experts = Spy()
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]])
    peer(x)
    # expert 0's one slot: token 0 (first choice), expert 1's: token 1 (first choice); token 0's second choice
    # (expert 1) queues after all first choices and is dropped.
    assert torch.equal(captured[0], x[0, :1]) and torch.equal(captured[1], x[0, 1:2])


def test_ideal_bound_computes_the_layer_when_experts_are_equal_and_trains_every_expert():
    """The step benchmark's bound (``IdealTop2Experts``: every token's two expert passes as balanced GEMMs, no routing)
    costs what a top-2 layer's experts cost: with all experts holding the same weights it computes the zoo layer's
    output (renormalised top-2 weights sum to 1), and every expert gets a gradient (so the optimizer's work matches)."""
    import torch

    P = _ds_peer()
    layer = _top2_layer()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.copy_(p[:1].expand_as(p))  # expert 0's weights in every expert
    x = torch.randn(2, 5, 8)
    ideal = P.IdealTop2Experts(layer)
    with torch.no_grad():
        assert (layer(x) - ideal(x)).abs().max() <= 1e-5
    ideal(x).square().sum().backward()
    for p in layer.experts.parameters():
        assert p.grad is not None and (p.grad.flatten(1).abs().sum(1) > 0).all()  # each expert's slice got gradient
    assert P.replace_moe_layers(torch.nn.Sequential(layer), P.IdealTop2Experts) == 1


def test_free_stand_in_costs_nothing_but_keeps_the_backward():
    """The step benchmark's ceiling (``FreeMoE``): no expert or router parameters, output ``gain * x`` (0 at the
    start), and the one scalar gets a gradient, so a model's backward still runs through the blocks above it."""
    import torch

    P = _ds_peer()
    layer = _top2_layer()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), layer)
    assert P.replace_moe_layers(model, P.FreeMoE) == 1
    free = model[1]
    assert [n for n, _ in free.named_parameters()] == ["gain"]
    x = torch.randn(2, 5, 8)
    out = model(x)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert free.gain.grad is not None and free.gain.grad != 0
