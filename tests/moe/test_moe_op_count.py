"""How many aten ops one MoE training step issues outside the experts, and that the cheaper paths behind that
count compute exactly what the general ones do.

On the GPU every aten op is at least one kernel launch, and the eager V-MoE step was launch-bound: before the
rework, router, routing metadata, losses and statistics issued ~200 ops per MoE layer forward + backward. The
bounds below sit a little above today's counts, so that re-adding per-op overhead fails here rather than in a
GPU profile.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zoo.moe import MoEConfig, MoELayer
from zoo.moe.losses import _cv_squared


class _AtenOps(TorchDispatchMode):
    """Counts the aten ops dispatched while active, views and detach aside (they launch nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func._schema.name == "aten::detach"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _stub_experts(x, expert_index, combine_weight, keep, experts):
    # Stand-in for the expert path (its own kernels are not what is counted here): two ops forward, three
    # backward, and the gradient still reaches the combine weights and through them the router.
    return x * combine_weight.sum(-1, keepdim=True)


def vmoe_layer(**overrides) -> MoELayer:
    """A V-MoE-B/16 MoE layer's routing (E=8, k=2, noisy top-k, BPR, capacity 1.05, importance + load losses),
    narrow (the op count does not depend on the width), with stub experts."""
    cfg = dict(num_experts=8, top_k=2, noise_std=1.0, batch_priority=True, capacity_factor=1.05, group_size=8,
               importance_loss_weight=0.005, load_loss_weight=0.005)
    torch.manual_seed(0)
    layer = MoELayer(16, 32, MoEConfig(**{**cfg, **overrides})).train()
    layer.expert_dispatcher = _stub_experts
    return layer


def count_training_step(layer: MoELayer, x: torch.Tensor, mask=None) -> tuple[int, int]:
    """(forward ops, backward ops) of one training step: output and aux loss, gradients to x and the router."""
    with _AtenOps() as forward:
        y = layer(x, mask)
    grads = [torch.ones_like(y), torch.ones_like(layer.aux.loss)]
    with _AtenOps() as backward:
        torch.autograd.backward([y, layer.aux.loss], grads)
    return forward.count, backward.count


# Measured with torch 2.15 on CPU (stub experts' 2 + 3 ops included): unmasked 57 forward + 41 backward,
# with a mask 72 + 44. Before the rework the same step issued 131 + 81 (either case). The slack allows for small
# differences between torch versions' decompositions.
@pytest.mark.parametrize("masked,max_forward,max_backward", [(False, 61, 45), (True, 76, 48)])
def test_vmoe_training_step_op_count(masked, max_forward, max_backward):
    layer = vmoe_layer()
    x = torch.randn(16, 197, 16, requires_grad=True)  # two groups of 8 images of 197 tokens
    mask = None
    if masked:
        mask = torch.rand(16, 197, generator=torch.Generator().manual_seed(0)) > 0.1
    n_forward, n_backward = count_training_step(layer, x, mask)
    assert n_forward <= max_forward, f"{n_forward} aten ops in the forward (bound {max_forward})"
    assert n_backward <= max_backward, f"{n_backward} aten ops in the backward (bound {max_backward})"


def test_unmasked_training_step_reads_nothing_back_to_the_host():
    """Without a mask even ``capacity_from_valid_tokens`` needs no count from the device: every token is valid."""
    from .test_moe_layer import _HostReads

    layer = vmoe_layer(capacity_from_valid_tokens=True)
    x = torch.randn(16, 9, 16, requires_grad=True)
    with _HostReads() as mode:
        y = layer(x)
        torch.autograd.backward([y, layer.aux.loss], [torch.ones_like(y), torch.ones_like(layer.aux.loss)])
    assert mode.reads == []
    assert layer.aux.stats.capacity == 20  # ceil(72 tokens * 2 * 1.05 / 8) = 19, rounded up to a multiple of 4


# ------------------------------------------------------------------------------- shortcuts are exact
def _step(layer, x, mask=None, modality=None, seed=1):
    """Outputs, losses, statistics and gradients of one training step with reproducible router noise."""
    layer.zero_grad(set_to_none=True)
    layer.router.generator = torch.Generator().manual_seed(seed)
    x = x.detach().requires_grad_(True)
    y = layer(x, mask, modality)
    torch.autograd.backward([y, layer.aux.loss], [torch.ones_like(y), torch.ones_like(layer.aux.loss)])
    out = {"y": y, "x.grad": x.grad, "loss": layer.aux.loss}
    out.update({f"losses.{k}": v for k, v in layer.aux.losses.items()})
    out.update({f"stats.{f.name}": getattr(layer.aux.stats, f.name) for f in dataclasses.fields(layer.aux.stats)})
    out.update({f"grad.{k}": p.grad for k, p in layer.named_parameters() if p.grad is not None})
    return out


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("overrides", [dict(), dict(dropless=True), dict(batch_priority=False),
                                       dict(load_loss_weight=0.01), dict(importance_loss_weight=0.0)])
def test_no_mask_gives_bit_for_bit_what_an_all_true_mask_gives(overrides):
    """Without a mask the router, V-MoE's losses and the statistics skip their masking kernels; the result must
    be exactly the one an all-True mask gives (which takes the masked path)."""
    layer = vmoe_layer(**overrides)
    layer.expert_dispatcher = None  # the real (sorted) experts
    x = torch.randn(16, 9, 16)
    _assert_identical(_step(layer, x), _step(layer, x, mask=torch.ones(16, 9, dtype=torch.bool)))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("overrides", [dict(), dict(dropless=True), dict(capacity_factor=0.5)])
def test_topk_statistics_from_expert_demand_match_the_per_token_path(masked, overrides):
    """Without modality ids the top-k statistics come from the router's per-expert demand; with modality ids
    (all 0 here) they come from per-token one-hots. Both must give the same numbers."""
    layer = vmoe_layer(num_modalities=2, **overrides)
    x = torch.randn(12, 9, 16)  # 12 images: the second group is padded, so masked tokens either way
    mask = torch.rand(12, 9, generator=torch.Generator().manual_seed(3)) > 0.2 if masked else None
    fast = _step(layer, x, mask)
    general = _step(layer, x, mask, modality=torch.zeros(12, 9, dtype=torch.long))
    _assert_identical({k: v for k, v in fast.items() if k.startswith("stats.")},
                      {k: v for k, v in general.items() if k.startswith("stats.")})
    if overrides.get("capacity_factor") == 0.5:
        assert fast["stats.dropped_fraction"] > 0  # the comparison covers dropping


def test_cv_squared_closed_form_gradient():
    """``(std/mean)^2`` has a hand-written backward: it must match autograd through the plain formula, also
    on a row whose mean is clamped (all zero: a fully masked group) and on a constant row (std 0)."""
    def plain(x):
        return (x.std(dim=-1, correction=0) / x.mean(dim=-1).clamp_min(1e-12)) ** 2

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 5, 8, generator=gen, dtype=torch.float64) * 3 + 0.1
    assert torch.autograd.gradcheck(_cv_squared, (x.requires_grad_(True),))
    x = x.detach().clone()
    x[0, 1] = 0.0
    x[1, 2] = 0.7
    x.requires_grad_(True)
    g = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    assert torch.equal(_cv_squared(x), plain(x))
    got, = torch.autograd.grad(_cv_squared(x), x, g)
    want, = torch.autograd.grad(plain(x), x, g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_generation_skips_the_losses_and_statistics_of_every_moe_layer():
    """A decode step (one token per sequence, eval) inside routing_statistics_off() computes the same output with
    fewer ops and leaves ``aux`` None; generate() runs its steps that way; a training layer refuses it."""
    import zoo
    from zoo.models.generate import generate
    from zoo.moe import routing_statistics_off

    cfg = MoEConfig(num_experts=4, top_k=2, renormalize=True, dropless=True, noise_std=0.0, batch_priority=False,
                    group_size=1, activation="swiglu", expert_bias=False, num_modalities=2,
                    importance_loss_weight=0.0, load_loss_weight=0.0, switch_loss_weight=0.01, z_loss_weight=0.001)
    torch.manual_seed(0)
    layer = MoELayer(16, 32, cfg, causal=True).eval()
    x, mask, mod = torch.randn(4, 1, 16), torch.ones(4, 1, dtype=torch.bool), torch.zeros(4, 1, dtype=torch.long)
    with _AtenOps() as full:
        want = layer(x, mask, mod)
    assert layer.aux is not None
    with routing_statistics_off(), _AtenOps() as lean:
        got = layer(x, mask, mod)
    assert torch.equal(got, want) and layer.aux is None
    assert lean.count <= full.count - 20, (lean.count, full.count)

    layer.train()
    with routing_statistics_off(), pytest.raises(RuntimeError, match="training objective"):
        layer(x, mask, mod)

    model = zoo.create_model("decoder_tiny_moe").eval()
    seen = []
    for block in model.blocks:
        if isinstance(block.mlp, MoELayer):
            block.mlp.register_forward_hook(lambda m, a, out: seen.append(m.aux))
    generate(model, torch.randint(0, model.config.vocab_size, (2, 5)), max_new_tokens=3)
    assert seen and all(a is None for a in seen)
    model(torch.randint(0, model.config.vocab_size, (2, 5)))  # outside generate: statistics as before
    assert all(layer.aux is not None for layer in model.modules() if isinstance(layer, MoELayer))
