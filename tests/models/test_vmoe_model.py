"""V-MoE: placements, the paper's presets, every preset file, whole-model determinism, input checks."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.models import VMoEConfig, resolve_moe_layers
from zoo.moe import MoELayer, moe_layers


# ---------------------------------------------------------------------------------------- placements
def test_resolve_moe_layers():
    assert resolve_moe_layers(12, every=2) == (1, 3, 5, 7, 9, 11)
    assert resolve_moe_layers(12, last=2) == (9, 11)
    assert resolve_moe_layers(32, last=5) == (23, 25, 27, 29, 31)  # V-MoE "Last-5" of H/14
    assert resolve_moe_layers(8, every=1) == tuple(range(8))
    assert resolve_moe_layers(8, every=3) == (2, 5)
    assert resolve_moe_layers(12, last=0) == ()
    assert resolve_moe_layers(12, layers=(5, 1, 5)) == (1, 5)
    assert resolve_moe_layers(12) == ()
    with pytest.raises(ValueError, match="at most one"):
        resolve_moe_layers(12, every=2, last=2)
    with pytest.raises(ValueError, match="odd blocks"):
        resolve_moe_layers(12, last=7)
    with pytest.raises(ValueError, match="out of range"):
        resolve_moe_layers(12, layers=(12,))
    with pytest.raises(ValueError):
        resolve_moe_layers(12, every=0)


# ------------------------------------------------------------------------------------ paper presets
# Riquelme et al. 2021, Table 8 / ViT (Dosovitskiy et al.) sizes: width, depth, MLP, heads.
PAPER = {"s": (512, 8, 2048, 8), "b": (768, 12, 3072, 12), "l": (1024, 24, 4096, 16), "h": (1280, 32, 5120, 16)}


@pytest.mark.parametrize("size", "sblh")
@pytest.mark.parametrize("patch", [14, 16, 32])
def test_paper_presets(size, patch):
    name = f"vmoe_{size}{patch}"
    cfg = zoo.model_config(name)
    enc = cfg.encoder
    assert (enc.dim, enc.depth, enc.mlp_dim, enc.num_heads) == PAPER[size]
    assert (cfg.image_size, cfg.patch_size, cfg.num_classes, cfg.in_chans) == (224, patch, 1000, 3)
    moe = enc.moe
    assert (moe.num_experts, moe.top_k, moe.noise_std, moe.capacity_factor, moe.group_size) == (32, 2, 1.0, 1.05, 8)
    assert moe.capacity_multiple_of == 4 and moe.router == "topk" and not moe.renormalize
    assert (moe.importance_loss_weight, moe.load_loss_weight) == (0.005, 0.005)
    assert enc.moe_layer_indices == tuple(range(1, PAPER[size][1], 2))  # every other block


def vmoe_param_count(cfg: VMoEConfig) -> int:
    """Parameters of a V-MoE from its config, counted by hand (independent of the module tree)."""
    enc, D, H = cfg.encoder, cfg.encoder.dim, cfg.encoder.mlp_dim
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    total = cfg.in_chans * cfg.patch_size**2 * D + D       # patch embedding conv
    total += D + (1 + n_patches) * D                        # CLS token, position embedding
    moe_at = set(enc.moe_layer_indices)
    E = enc.moe.num_experts
    h1 = 2 * H if enc.activation == "swiglu" else H
    for i in range(enc.depth):
        total += 4 * D                                      # two LayerNorms
        total += 3 * D * D + 3 * D + D * D + D              # qkv + proj
        if i in moe_at:
            total += D * E                                  # router (no bias)
            total += E * (D * h1 + h1 + H * D + D)          # experts
        else:
            total += D * h1 + h1 + H * D + D
    total += 2 * D                                          # final LayerNorm
    rep = cfg.representation_size
    if rep:
        total += D * rep + rep
    total += (rep or D) * cfg.num_classes + cfg.num_classes
    return total


def test_vmoe_s16_parameter_count_matches_paper():
    # V-MoE-S/16 with 32 experts every other layer: ~ 0.29 B parameters (paper, Table 8 order of magnitude).
    cfg = zoo.model_config("vmoe_s16")
    assert 2.8e8 < vmoe_param_count(cfg) < 3.0e8


ALL_PRESETS = zoo.list_models()


def test_preset_list():
    vmoe = zoo.list_models(family="vmoe")
    for size in "sblh":
        for patch in (14, 16, 32):
            assert f"vmoe_{size}{patch}" in vmoe
    assert "vmoe_tiny_test" in vmoe
    assert zoo.list_models("vmoe_s*") == ["vmoe_s14", "vmoe_s16", "vmoe_s32", "vmoe_small_cifar", "vmoe_small_mnist"]


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_every_preset_loads_and_builds(name):
    """Every YAML loads into its typed config; every model builds on the meta device (no memory, no init
    cost) with the expected parameter count; small ones (< 2.5M parameters) are really built and run."""
    from zoo.registry import load_preset

    preset = load_preset(name)
    cfg = zoo.model_config(name)
    assert type(cfg) is zoo.registry.get_family(preset["family"]).config_cls
    with torch.device("meta"):
        model = zoo.create_model(name)
    n_params = sum(p.numel() for p in model.parameters())
    if preset["family"] == "vmoe":
        assert n_params == vmoe_param_count(cfg)
        assert len(moe_layers(model)) == len(cfg.encoder.moe_layer_indices)
    if n_params > 2_500_000:
        return
    torch.manual_seed(0)
    model = zoo.create_model(name).eval()
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    if preset["family"] == "vmoe":
        with torch.no_grad():
            out = model(torch.randn(2, cfg.in_chans, cfg.image_size, cfg.image_size))
        assert out.logits.shape == (2, cfg.num_classes) and torch.isfinite(out.logits).all()
        assert len(out.routing) == len(cfg.encoder.moe_layer_indices)


# ------------------------------------------------------------------------------------- determinism
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = zoo.create_model("vmoe_tiny_test")
    with torch.no_grad():  # the head is zero-initialised: randomise it so logits depend on the tokens
        model.head.weight.normal_(0, 0.5)
    return model


def test_eval_is_deterministic(tiny):
    tiny.eval()
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = tiny(x), tiny(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden_states, b.hidden_states)
    assert a.logits.std() > 0
    for ra, rb in zip(a.routing, b.routing):
        assert torch.equal(ra.top1_expert, rb.top1_expert)
        assert ra.top1_expert.shape == (5, 17)
    assert "load_loss" not in a.aux_losses  # no noise in eval, so no load loss


def test_train_mode_routing_noise_depends_on_the_seed(tiny):
    tiny.train()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    noisy = []
    for layer in moe_layers(tiny):
        layer.router.register_forward_hook(lambda m, i, o: noisy.append(o.noisy_logits - o.logits))

    def run(seed):
        noisy.clear()
        torch.manual_seed(seed)
        out = tiny(x)
        return out, [n.detach().clone() for n in noisy]

    try:
        out0, n0 = run(0)
        out0b, n0b = run(0)
        out1, n1 = run(1)
    finally:
        for layer in moe_layers(tiny):
            layer.router._forward_hooks.clear()
        tiny.eval()
    assert len(n0) == 2
    assert all(torch.equal(a, b) for a, b in zip(n0, n0b))           # same seed: same noise
    assert all(not torch.equal(a, b) for a, b in zip(n0, n1))        # another seed: other noise
    assert all(n.abs().max() > 0 for n in n0)
    assert torch.equal(out0.hidden_states, out0b.hidden_states)
    assert not torch.equal(out0.hidden_states, out1.hidden_states)
    assert "load_loss" in out0.aux_losses and out0.aux_loss > 0


def test_moe_placement_in_built_model(tiny):
    kinds = [isinstance(b.mlp, MoELayer) for b in tiny.encoder.blocks]
    assert kinds == [False, True, False, True]


# ------------------------------------------------------------------------------------ input errors
@pytest.mark.parametrize("bad,match", [
    (lambda: torch.randn(2, 1, 16, 16), r"expected 3 channel\(s\), got 1"),
    (lambda: torch.randn(2, 3, 32, 32), r"expected 16x16 images, got 32x32"),
    (lambda: torch.randn(2, 3, 16, 8), r"expected 16x16 images, got 16x8"),
    (lambda: torch.randn(3, 16, 16), r"\[B, C, H, W\].*unsqueeze\(0\)"),
    (lambda: torch.randint(0, 255, (2, 3, 16, 16)), r"floating-point"),
    (lambda: torch.full((2, 3, 16, 16), float("nan")), r"NaN or Inf"),
    (lambda: torch.randn(2, 3, 16, 16).index_fill_(2, torch.tensor([3]), float("inf")), r"NaN or Inf"),
])
def test_bad_images_raise_helpful_value_error(tiny, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(bad())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the device-side finite check")
def test_cuda_image_check_does_not_wait_for_the_gpu():
    from zoo.layers import validate_images

    images = torch.randn(2, 3, 16, 16, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any device->host read raises
    try:
        validate_images(images, 3, 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()  # and the device-side assert passed for finite images


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the device-side finite check")
def test_cuda_nan_images_stop_the_run():
    # In a subprocess: a device-side assert leaves the process's CUDA context unusable.
    import subprocess
    import sys

    code = ("import torch; from zoo.layers import validate_images; "
            "validate_images(torch.full((2, 3, 16, 16), float('nan'), device='cuda'), 3, 16); "
            "torch.cuda.synchronize(); print('no error')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no error" not in proc.stdout
    assert "assert" in proc.stderr.lower(), proc.stderr[-1000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: on CPU the reference dispatcher's expert split "
                    "has data-dependent sizes, which a whole-model graph cannot hold")
def test_cuda_whole_model_compiles_to_one_graph():
    """torch.compile(model, fullgraph=True) on the fused GPU path: the image check, every block, routing, losses and the
    fused experts (a custom op) trace as one graph, and a training step matches the eager model."""
    import zoo

    torch.manual_seed(0)
    model = zoo.create_model("vmoe_tiny_digits").cuda().train()
    cfg = model.config
    images = torch.randn(8, cfg.in_chans, cfg.image_size, cfg.image_size, device="cuda")

    def step(m):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the router noise
        out = m(images)
        (out.logits.square().mean() + out.aux_loss).backward()
        return [out.logits.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref = step(model)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):  # the router noise drawn as eagerly
        got = step(torch.compile(model, fullgraph=True))
    assert len(got) == len(ref) > 10
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_channel_mismatch_message_names_the_channels():
    from zoo.layers import validate_images

    with pytest.raises(ValueError, match=r"expected 3 channel\(s\), got 1 .*create the model with in_chans=1$"):
        validate_images(torch.zeros(2, 1, 16, 16), 3, 16)
