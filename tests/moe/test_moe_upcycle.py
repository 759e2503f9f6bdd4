"""Sparse upcycling: an upcycled model computes the dense model's function when the combine weights of a
token sum to 1 and no token is dropped; otherwise it does not."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import timm
import torch

import zoo
from zoo.moe import MoELayer, moe_layers


@pytest.fixture(scope="module")
def dense_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    with torch.no_grad():  # timm zero-inits the head and biases: randomise so every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def upcycled(dense_vit):
    return zoo.upcycle(copy.deepcopy(dense_vit), num_experts=4, top_k=2, renormalize=True, dropless=True)


def set_routing(model, **changes):
    """Change every MoE layer's config / router flags in place (one upcycled model serves several tests)."""
    for layer in moe_layers(model):
        layer.config = replace(layer.config, **{k: v for k, v in changes.items() if k != "renormalize"})
        if "renormalize" in changes:
            layer.router.renormalize = changes["renormalize"]
        layer.router.capacity_multiple_of = layer.config.capacity_multiple_of


def test_upcycled_timm_vit_equals_dense(dense_vit, upcycled, images):
    with torch.no_grad():
        ref = dense_vit(images)
        layers = moe_layers(upcycled)
        assert len(layers) == 12 and all(isinstance(b.mlp, MoELayer) for b in upcycled.blocks)
        cfg = layers[0].config
        assert (cfg.num_experts, cfg.top_k, cfg.renormalize, cfg.dropless) == (4, 2, True, True)
        assert cfg.activation == "gelu"  # timm ViT uses exact GELU
        assert not upcycled.training
        assert max_diff(upcycled(images), ref) <= 1e-5
        # Training mode too: noisy routing picks other experts, but every expert is the same MLP.
        try:
            upcycled.train()
            dense_vit.train()
            assert max_diff(upcycled(images), dense_vit(images)) <= 1e-5
            assert layers[0].aux.stats.capacity is None
        finally:
            upcycled.eval()
            dense_vit.eval()


def test_upcycle_passes_capacity_settings():
    torch.manual_seed(0)
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10,
                              depth=2)
    moe = zoo.upcycle(small, num_experts=4, top_k=2, renormalize=True, capacity_factor=2.0, group_size=2)
    cfg = moe_layers(moe)[0].config
    assert (cfg.capacity_factor, cfg.dropless, cfg.group_size, cfg.renormalize) == (2.0, False, 2, True)


def test_upcycled_with_enough_capacity_equals_dense(dense_vit, upcycled, images):
    # capacity_factor = E / k: C = ceil(S * k * (E/k) / E) = S (17 tokens/image here), every token fits.
    try:
        set_routing(upcycled, dropless=False, capacity_factor=2.0, capacity_multiple_of=1)
        with torch.no_grad():
            out = upcycled(images)
        for layer in moe_layers(upcycled):
            assert layer.aux.stats.capacity == 3 * 17
            assert layer.aux.stats.dropped_fraction.item() == 0.0
        assert max_diff(out, dense_vit(images)) <= 1e-5
        # ... and with too little capacity (tokens dropped) it differs, even renormalised.
        set_routing(upcycled, capacity_factor=0.5)
        with torch.no_grad():
            out = upcycled(images)
        assert moe_layers(upcycled)[0].aux.stats.dropped_fraction.item() > 0.2
        assert max_diff(out, dense_vit(images)) > 1e-3
    finally:
        set_routing(upcycled, dropless=True, capacity_factor=1.05, capacity_multiple_of=4)


def test_without_renormalisation_the_output_differs(dense_vit, upcycled, images):
    try:
        set_routing(upcycled, renormalize=False)
        with torch.no_grad():
            assert max_diff(upcycled(images), dense_vit(images)) > 1e-3
    finally:
        set_routing(upcycled, renormalize=True)
    with torch.no_grad():
        assert max_diff(upcycled(images), dense_vit(images)) <= 1e-5


def test_upcycle_every_second_block(dense_vit, images):
    with torch.no_grad():
        ref = dense_vit(images)
        moe = zoo.upcycle(copy.deepcopy(dense_vit), num_experts=2, top_k=1, every=2, renormalize=True, dropless=True)
        kinds = [isinstance(b.mlp, MoELayer) for b in moe.blocks]
        assert kinds == [i % 2 == 1 for i in range(12)]
        assert max_diff(moe(images), ref) <= 1e-5


def test_upcycled_zoo_dense_transformer_equals_dense():
    torch.manual_seed(0)
    dense = zoo.create_model("vmoe_tiny_test", **{"encoder.moe_every": None}).eval()
    assert moe_layers(dense) == []
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x = torch.randn(4, 3, 16, 16)
        ref = dense(x).logits
        assert ref.std() > 1e-3  # non-trivial logits, so equality below means something
        moe = zoo.upcycle(copy.deepcopy(dense), num_experts=4, top_k=2, renormalize=True, dropless=True)
        assert len(moe_layers(moe)) == 4
        assert moe_layers(moe)[0].config.activation == "gelu_tanh"
        assert max_diff(moe(x).logits, ref) <= 1e-5
        plain = zoo.upcycle(copy.deepcopy(dense), num_experts=4, top_k=2, moe_layers=[1, 3], dropless=True)
        assert [isinstance(b.mlp, MoELayer) for b in plain.encoder.blocks] == [False, True, False, True]
        assert max_diff(plain(x).logits, ref) > 1e-4


def test_upcycle_errors(upcycled):
    with pytest.raises(TypeError, match="renormalize"):
        zoo.upcycle(torch.nn.Module(), renormalise=True)
    with pytest.raises(ValueError, match="already an MoE"):
        zoo.upcycle(upcycled, num_experts=2, top_k=1, every=2)
    with pytest.raises(TypeError, match="cannot find transformer blocks"):
        zoo.upcycle(torch.nn.Linear(2, 2))
