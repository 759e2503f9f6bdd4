"""Decoder LM (zoo/models/decoder.py), its layers (norm, RoPE, KV cache, attention) and generation."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.config import ConfigError
from zoo.layers.kv_cache import KVCache, causal_attention_mask
from zoo.layers.norm import RMSNorm, make_norm
from zoo.layers.rope import RotaryEmbedding
from zoo.models.decoder import DecoderConfig, DecoderLM, decoder_moe_layers
from zoo.models.generate import filter_logits
from zoo.moe import MoEConfig, MoELayer

MOE = dict(num_experts=4, top_k=2, renormalize=True, dropless=True, noise_std=0.0, batch_priority=False,
           group_size=1, activation="swiglu", expert_bias=False, importance_loss_weight=0.0, load_loss_weight=0.0)

# Layout variants: LLaMA-like GQA, Phi-2-like (parallel, partial rotary, LayerNorm, GELU, biases, fused qkv),
# OLMoE-like (q/k norm, MoE everywhere, no renormalisation), tied embeddings with MoE-LLaVA "sparse" placement.
VARIANTS = {
    "llama_gqa": dict(num_kv_heads=2),
    "phi_parallel": dict(parallel_residual=True, rotary_fraction=0.5, norm="layernorm", activation="gelu_tanh",
                         mlp_bias=True, qkv_bias=True, attn_out_bias=True, lm_head_bias=True, fused_qkv=True),
    "olmoe_qknorm": dict(qk_norm=True, moe_placement="all", moe=dict(MOE, renormalize=False)),
    "tied_sparse_moe": dict(tie_embeddings=True, moe_placement="sparse", moe=MOE),
}


def tiny(variant: str = "llama_gqa", seed: int = 0, **over) -> DecoderLM:
    torch.manual_seed(seed)
    kw = dict(vocab_size=61, dim=32, depth=4, num_heads=4, mlp_dim=48, max_seq_len=64, init_std=0.2)
    kw.update(VARIANTS[variant])
    kw.update(over)
    if isinstance(kw.get("moe"), dict):
        kw["moe"] = MoEConfig(**kw["moe"])
    return DecoderLM(DecoderConfig(**kw)).eval()


# ------------------------------------------------------------------------------------------- layers
def test_rmsnorm_formula_and_norm_choice():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    ln = make_norm("layernorm", 8, 1e-5, bias=False)
    assert isinstance(ln, torch.nn.LayerNorm) and ln.bias is None and ln.eps == 1e-5
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("batchnorm", 8, 1e-5)


def test_rope_is_relative_and_partial():
    """q.k after RoPE depends only on the position difference; channels past rotary_dim are untouched."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, base=100.0, rotary_fraction=0.5)
    assert rope.rotary_dim == 8
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def rotated(x, pos):
        cos, sin = rope.cos_sin(torch.tensor([[pos]]), torch.float32)
        return rope.apply(x, cos, sin)

    dots = [(rotated(q, p + 3) * rotated(k, p)).sum() for p in (0, 5, 17)]
    torch.testing.assert_close(dots[0], dots[1])
    torch.testing.assert_close(dots[0], dots[2])
    assert torch.equal(rotated(q, 7)[..., 8:], q[..., 8:])
    assert not torch.allclose(rotated(q, 7)[..., :8], q[..., :8])
    torch.testing.assert_close(rotated(q, 7).norm(), q.norm())
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(head_dim=10, rotary_fraction=0.3)


def test_attention_mask_left_padding():
    key_valid = torch.tensor([[False, True, True], [True, True, True]])
    m = causal_attention_mask(key_valid, torch.arange(3))[:, 0]
    assert m[1].equal(torch.ones(3, 3, dtype=torch.bool).tril())
    # The padded query (slot 0 of row 0) sees only itself; real queries never see the padded key.
    assert m[0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]


# ------------------------------------------------------------------------------------------ config
def test_moe_placements():
    assert decoder_moe_layers(8, "sparse") == (0, 2, 4, 6)
    assert decoder_moe_layers(8, "first_half") == (0, 1, 2, 3)
    assert decoder_moe_layers(8, "second_half") == (4, 5, 6, 7)
    assert decoder_moe_layers(8, "dense") == ()
    assert decoder_moe_layers(8, "all") == tuple(range(8))
    assert decoder_moe_layers(8, [5, 1]) == (1, 5)
    assert decoder_moe_layers(8, every=2) == (1, 3, 5, 7)  # V-MoE's values still work
    assert decoder_moe_layers(8, last=2) == (5, 7)
    with pytest.raises(ValueError, match="at most one"):
        decoder_moe_layers(8, "sparse", every=2)
    with pytest.raises(ValueError, match="unknown MoE placement"):
        decoder_moe_layers(8, "odd")
    with pytest.raises(ValueError, match="out of range"):
        decoder_moe_layers(4, [4])


def test_config_errors():
    with pytest.raises(ConfigError, match="moe is None"):
        zoo.create_model("decoder_tiny", moe_placement="sparse")
    with pytest.raises(ConfigError, match="causal routing"):
        zoo.create_model("decoder_tiny_moe", **{"moe.router": "expert_choice"})
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        zoo.create_model("decoder_tiny", num_kv_heads=3)
    with pytest.raises(ConfigError, match="moe_placement"):
        zoo.create_model("decoder_tiny_moe", moe_placement="every_other")


def test_presets_place_moe_layers():
    model = zoo.create_model("decoder_tiny_moe")
    kinds = [type(b.mlp).__name__ for b in model.blocks]
    assert kinds == ["MoELayer", "Mlp", "MoELayer", "Mlp"]
    cfg = zoo.model_config("mixtral_8x7b")
    assert cfg.moe_layer_indices == tuple(range(32)) and cfg.kv_heads == 8 and cfg.moe.renormalize
    assert not zoo.model_config("olmoe_1b_7b").moe.renormalize
    with torch.device("meta"):
        phi = zoo.create_model("phi2")
    assert 2.7e9 < sum(p.numel() for p in phi.parameters()) < 2.8e9  # Phi-2: 2.78B parameters
    with torch.device("meta"):
        llama = zoo.create_model("llama2_7b")
    assert sum(p.numel() for p in llama.parameters()) == 6_738_415_616  # LLaMA-2-7B's count


def test_tied_embeddings_share_the_matrix():
    model = tiny("tied_sparse_moe")
    assert model.lm_head.weight is model.embed.weight


# --------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_future_tokens_do_not_change_past_logits(variant):
    model = tiny(variant)
    torch.manual_seed(1)
    ids = torch.randint(0, 61, (3, 12))
    changed = ids.clone()
    changed[:, 8:] = torch.randint(0, 61, (3, 4))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    if model.config.moe is None:
        assert torch.equal(a[:, :8], b[:, :8])
    else:  # same routing; the experts' matmuls see other row counts, so float rounding may differ (~1e-6)
        torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-5, rtol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


# ---------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kv_cache_decoding_equals_full_forward(variant):
    model = tiny(variant)
    torch.manual_seed(2)
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 16)
        steps = [model(ids[:, :6], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(6, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_decode_step_reuses_the_preallocated_cache():
    """A decode step writes into the cache tensors in place and attends over all T slots: same tensors, same
    shapes at every step (what a CUDA graph of the step needs)."""
    model = tiny()
    cache = model.new_cache(2, 12)
    ptrs = [t.data_ptr() for t in (*cache.keys, *cache.values, cache.key_valid)]
    seen_shapes = set()
    attn = model.blocks[0].attn
    hook = attn.register_forward_hook(lambda m, a, out: seen_shapes.add(tuple(a[3].shape)))
    with torch.no_grad():
        model(torch.randint(0, 61, (2, 5)), cache=cache)
        for _ in range(4):
            model(torch.randint(0, 61, (2, 1)), cache=cache)
    hook.remove()
    assert [t.data_ptr() for t in (*cache.keys, *cache.values, cache.key_valid)] == ptrs
    assert seen_shapes == {(2, 1, 5, 12), (2, 1, 1, 12)} and cache.length == 9 and cache.next_slot.item() == 9
    assert all(k[:, :, 9:].abs().sum() == 0 for k in (*cache.keys, *cache.values))  # untouched slots


def test_each_layer_caches_in_its_own_tensor():
    """Per-layer cache tensors, not views of one [L, ...] tensor: written through views, a compiled decode step
    rebuilt and copied every layer's cache in every step (zoo/layers/kv_cache.py says what it cost)."""
    model = tiny()
    cache = model.new_cache(2, 12)
    tensors = [*cache.keys, *cache.values]
    assert len(cache.keys) == len(cache.values) == model.config.depth
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
    assert all(t.shape == (2, model.config.kv_heads, 12, model.config.head_width) and t.is_contiguous()
               for t in tensors)


@pytest.mark.parametrize("variant,over", [("llama_gqa", {}), ("olmoe_qknorm", {}),
                                          ("phi_parallel", {"fused_qkv": False})])
def test_fuse_qkv_keeps_the_logits_and_round_trips(variant, over, tmp_path):
    """``fuse_qkv_`` (inference: one GEMV instead of three per decode step) gives the same logits, full forward and
    KV-cached decode, with GQA, q/k norms and biases; the fused model saves and loads as a fused-qkv model."""
    import zoo

    model = tiny(variant, **over)
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        cache = model.new_cache(2, 12)
        ref_step = model(ids[:, :1], cache=cache).logits
    assert model.fuse_qkv_() is model and model.config.fused_qkv
    assert all(not hasattr(b.attn, "q_proj") and b.attn.fused_qkv for b in model.blocks)
    assert model.fuse_qkv_() is model  # a no-op the second time
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)
        cache = model.new_cache(2, 12)
        torch.testing.assert_close(model(ids[:, :1], cache=cache).logits, ref_step, atol=1e-5, rtol=0)
    zoo.save_pretrained(model, tmp_path / "fused")
    loaded = zoo.create_model(f"local-dir:{tmp_path / 'fused'}").eval()
    assert loaded.config.fused_qkv
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, atol=1e-5, rtol=0)


def test_prompt_longer_than_cache_is_a_clear_error():
    model = tiny()
    ids = torch.randint(0, 61, (1, 10))
    with pytest.raises(ValueError, match="max_cache_len=8"):
        model.generate(ids, max_new_tokens=4, max_cache_len=8)
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="do not fit in the KV cache"):
        model(ids, cache=cache)
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.randint(0, 61, (2, 3)), cache=cache)


# -------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("variant", ["llama_gqa", "tied_sparse_moe", "phi_parallel"])
def test_left_padded_batch_generates_what_each_sequence_generates_alone(variant):
    model = tiny(variant)
    torch.manual_seed(3)
    prompts = [torch.randint(1, 61, (n,)) for n in (7, 3, 5)]
    S = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), S, dtype=torch.long)
    mask = torch.zeros(len(prompts), S, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, S - len(p):], mask[i, S - len(p):] = p, 1
    batch = model.generate(ids, mask, max_new_tokens=10)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=10)
        assert batch[i, S:].tolist() == alone[0, len(p):].tolist()
        with torch.no_grad():  # and the logits of the real tokens match the unpadded forward
            torch.testing.assert_close(model(ids[i:i + 1], mask[i:i + 1]).logits[0, S - len(p):],
                                       model(p[None]).logits[0], atol=1e-5, rtol=0)


def test_greedy_is_deterministic_and_matches_argmax_of_full_forward():
    model = tiny("tied_sparse_moe")
    ids = torch.randint(0, 61, (2, 4))
    out = model.generate(ids, max_new_tokens=6)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], ids)
    assert torch.equal(out, model.generate(ids, max_new_tokens=6))
    with torch.no_grad():  # every generated token is the argmax of the full forward over what came before
        logits = model(out[:, :-1]).logits
    assert torch.equal(logits[:, 3:].argmax(-1), out[:, 4:])


def test_sampling_eos_and_padding_checks():
    model = tiny()
    ids = torch.randint(0, 61, (3, 4))
    greedy = model.generate(ids, max_new_tokens=5)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=True, top_k=1), greedy)
    g = torch.Generator().manual_seed(0)
    s1 = model.generate(ids, max_new_tokens=5, do_sample=True, temperature=2.0, generator=g)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=True, temperature=2.0, generator=g), s1)
    eos = int(greedy[0, 5])  # row 0 emits it at its 2nd new token: later tokens are eos (the pad default)
    out = model.generate(ids, max_new_tokens=5, eos_token_id=eos)
    assert (out[0, 5:] == eos).all()
    with pytest.raises(ValueError, match="LEFT"):
        model.generate(ids, torch.tensor([[1, 1, 1, 0]] * 3), max_new_tokens=2)


def test_filter_logits_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=3, top_p=0.99))
    assert kept.tolist() == [[True, True, True, False]]
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, temperature=0.0)
