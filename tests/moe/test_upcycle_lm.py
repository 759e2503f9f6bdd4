"""Upcycling decoder LMs (zoo/models/upcycle.py): the zoo decoder and transformers causal LMs; identical experts
with renormalised gates give the dense model's logits; noise makes the experts differ."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.moe import MoELayer, moe_layers

transformers = pytest.importorskip("transformers")


def dense_decoder(**over):
    torch.manual_seed(0)
    return zoo.create_model("decoder_tiny", init_std=0.1, **over).eval()


def test_upcycled_zoo_decoder_equals_dense_and_saves(tmp_path):
    dense = dense_decoder()
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        ref = dense(ids).logits
    moe = zoo.upcycle(dense, num_experts=4, top_k=2, moe_layers="sparse")
    assert moe is not dense and moe_layers(dense) == []  # a copy: the dense model is untouched
    assert [isinstance(b.mlp, MoELayer) for b in moe.blocks] == [True, False, True, False]
    assert moe.config.moe_layer_indices == (0, 2) and moe.config.moe.renormalize and moe.config.moe.dropless
    with torch.no_grad():
        assert (moe(ids).logits - ref).abs().max() <= 1e-5
        assert torch.equal(moe.generate(ids[:, :4], max_new_tokens=8), dense.generate(ids[:, :4], max_new_tokens=8))
    zoo.save_pretrained(moe, tmp_path / "moe")
    again = zoo.create_model(f"local-dir:{tmp_path / 'moe'}").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, moe(ids).logits)


def test_upcycle_noise_and_inplace():
    dense = dense_decoder()
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        ref = dense(ids).logits
    g = torch.Generator().manual_seed(0)
    noisy = zoo.upcycle(dense, num_experts=4, top_k=2, moe_layers=[1], noise=0.1, generator=g)
    w1 = noisy.blocks[1].mlp.experts.w1
    assert not torch.allclose(w1[0], w1[1])
    assert (w1[0] - dense.blocks[1].mlp.fc1.weight.t()).abs().max() < 0.1  # near the dense weights
    with torch.no_grad():
        assert (noisy(ids).logits - ref).abs().max() > 1e-4
    same = zoo.upcycle(dense, num_experts=2, top_k=1, moe_layers="second_half", inplace=True)
    assert same is dense and len(moe_layers(dense)) == 2
    with pytest.raises(ValueError, match="top_k must be in"):
        zoo.upcycle(dense_decoder(), num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="noise"):
        zoo.upcycle(dense_decoder(), noise=-1.0)


COMMON = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("cls, cfg", [
    ("LlamaForCausalLM", "LlamaConfig"), ("Qwen2ForCausalLM", "Qwen2Config"),
    ("StableLmForCausalLM", "StableLmConfig"), ("PhiForCausalLM", "PhiConfig")])
def test_upcycled_transformers_lm_equals_dense(cls, cfg):
    torch.manual_seed(0)
    dense = getattr(transformers, cls)(getattr(transformers, cfg)(**COMMON)).eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 80, (2, 10))
    with torch.no_grad():
        ref = dense(ids).logits
        moe = zoo.upcycle(dense, num_experts=4, top_k=2, moe_layers="sparse")
        layers = moe_layers(moe)
        assert len(layers) == 2 and moe_layers(dense) == []
        expected = "gelu_tanh" if cls.startswith("Phi") else "swiglu"
        assert layers[0].config.activation == expected
        assert (moe(ids).logits - ref).abs().max() <= 1e-5
        # and the router really runs: unnormalised gates no longer sum to 1, so the function changes
        for layer in layers:
            layer.router.renormalize = False
        assert (moe(ids).logits - ref).abs().max() > 1e-4
