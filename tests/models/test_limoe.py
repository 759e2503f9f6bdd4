"""LIMoE: one shared MoE transformer for images and text (zoo/models/limoe.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import zoo
from zoo.models.limoe import LIMoE, LIMoEConfig, LIMoEOutput, text_mask_from_tokens
from zoo.moe import MoELayer

SOT, EOT = 49406, 49407


def tiny(**overrides) -> LIMoE:
    torch.manual_seed(0)
    return zoo.create_model("limoe_tiny_test", **overrides)


def captions(lengths: list[int], context: int) -> torch.Tensor:
    """Token rows ``SOT w1 .. wn EOT 0 ..`` with n = length - 2 words (ids 100 + i)."""
    rows = torch.zeros(len(lengths), context, dtype=torch.long)
    for r, n in enumerate(lengths):
        rows[r, 0] = SOT
        rows[r, 1:n - 1] = torch.arange(100 + r, 100 + r + n - 2)
        rows[r, n - 1] = EOT
    return rows


def test_presets_and_paper_shapes():
    names = zoo.list_models("limoe*")
    assert {"limoe_b16", "limoe_h14", "limoe_tiny_test", "limoe_tiny_mnist"} <= set(names)
    b16, h14 = zoo.model_config("limoe_b16"), zoo.model_config("limoe_h14")
    assert (b16.encoder.dim, b16.encoder.depth, b16.encoder.moe.num_experts, b16.encoder.moe.top_k) == (768, 12, 8, 1)
    assert b16.encoder.moe_layer_indices == (1, 3, 5, 7, 9, 11)
    assert (h14.patch_size, h14.encoder.dim, h14.encoder.depth, h14.encoder.moe.num_experts) == (14, 1280, 32, 32)
    enc = h14.encoder
    D, H, E = enc.dim, enc.mlp_dim, enc.moe.num_experts
    block = 4 * D * D + 4 * D + 2 * D * H + H + D + 4 * D  # attention, one MLP, two LayerNorms
    experts = len(enc.moe_layer_indices) * ((E - 1) * (2 * D * H + H + D) + D * E)  # extra experts + routers
    total = enc.depth * block + experts
    assert len(enc.moe_layer_indices) == 12
    assert 5.4e9 < total < 5.7e9  # the paper's 5.6B parameters (embeddings and heads add ~0.1B)


def test_config_validation():
    with pytest.raises(ValueError, match="num_modalities"):
        zoo.create_model("limoe_tiny_test", **{"encoder.moe.num_modalities": 1})
    with pytest.raises(ValueError, match="divisible"):
        zoo.create_model("limoe_tiny_test", image_size=18)


def test_forward_outputs_and_errors():
    m = tiny().eval()
    text = captions([5, 3, 9], 16)
    out = m(images=torch.randn(2, 3, 16, 16), text=text)
    assert isinstance(out, LIMoEOutput)
    assert out.image_embeds.shape == (2, 32) and out.text_embeds.shape == (3, 32) and out.logits.shape == (2, 3)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out.logits, out.logit_scale * out.image_embeds @ out.text_embeds.t())
    assert len(out.routing) == 1 and len(out.image_routing) == 1 and len(out.text_routing) == 1
    r = out.routing[0]
    assert r.top1_expert.shape == (5, 16)  # 2 images then 3 texts, padded with -1
    # image pass fills modality row 0 only, text pass row 1 only
    assert out.image_routing[0].tokens_per_expert_by_modality[1].sum() == 0
    assert out.text_routing[0].tokens_per_expert_by_modality[0].sum() == 0
    assert int((out.text_routing[0].top1_expert >= 0).sum()) == 5 + 3 + 9
    only_text = m(text=text)
    assert only_text.image_embeds is None and only_text.logits is None
    with pytest.raises(ValueError, match="context_length"):
        m(text=captions([5], 20))
    with pytest.raises(ValueError, match="token ids"):
        m(text=torch.tensor([[SOT, 60000, EOT]]))
    with pytest.raises(ValueError, match="needs images"):
        m()


def test_text_mask_keeps_exclamation_tokens():
    # id 0 is both padding and '!': only what follows the end token is padding.
    tokens = torch.tensor([[SOT, 5, 0, 7, EOT, 0, 0], [SOT, EOT, 0, 0, 0, 0, 0], [3, 4, 0, 0, 0, 0, 0]])
    mask = text_mask_from_tokens(tokens)
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]]


def _np_entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-20, None))).sum(-1)


def test_entropy_losses_match_hand_computation_with_known_router_weights():
    """Set the router weights, capture each router's input, and recompute the per-modality local and
    thresholded global entropy losses with numpy over the VALID tokens only (padding excluded)."""
    m = tiny(**{"encoder.moe.local_entropy_weight": 0.3, "encoder.moe.global_entropy_weight": 0.7,
                "encoder.moe.global_entropy_min_experts_by_modality": [3.5, 4.0]}).eval()
    layer = next(mod for mod in m.modules() if isinstance(mod, MoELayer))
    E, D = 4, 32
    W = torch.linspace(-2.0, 2.0, E * D).reshape(E, D).sin() * 3.0  # known, non-trivial router weights
    with torch.no_grad():
        layer.router.proj.weight.copy_(W)
    seen = []
    hook = layer.router.register_forward_hook(lambda mod, args, out: seen.append((args[0].detach(), args[1].detach())))
    text = captions([6, 3, 11], 16)
    out = m(images=torch.randn(3, 3, 16, 16), text=text)
    hook.remove()
    expected = {}
    for mod_id, (x, valid) in enumerate(seen):  # image pass, then text pass
        x = x.reshape(-1, D).double().numpy()
        v = valid.reshape(-1).numpy()
        logits = x @ W.double().numpy().T
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        p = p[v]  # only real tokens
        local = _np_entropy(p).mean()
        tau = math.log([3.5, 4.0][mod_id])
        glob = max(0.0, tau - _np_entropy(p.mean(0)))
        expected[f"local_entropy_m{mod_id}"] = local
        expected[f"global_entropy_m{mod_id}"] = glob
    assert int(seen[1][1].sum()) == 6 + 3 + 11  # padding never reached the router as valid
    assert expected["global_entropy_m1"] > 0  # tau = log(E) for text: active unless routing is exactly uniform
    for k, v in expected.items():
        assert float(out.aux_losses[k].detach()) == pytest.approx(v, rel=1e-5, abs=1e-6), k
    weighted = sum(0.3 * expected[f"local_entropy_m{i}"] + 0.7 * expected[f"global_entropy_m{i}"] for i in (0, 1))
    assert float(out.aux_loss.detach()) == pytest.approx(weighted, rel=1e-5)


def test_uniform_router_gives_log_e_local_entropy():
    m = tiny(**{"encoder.moe.local_entropy_weight": 1.0, "encoder.moe.global_entropy_weight": 1.0}).eval()
    for mod in m.modules():
        if isinstance(mod, MoELayer):
            torch.nn.init.zeros_(mod.router.proj.weight)
    out = m(images=torch.randn(2, 3, 16, 16), text=captions([4, 7], 16))
    for i in (0, 1):
        assert float(out.aux_losses[f"local_entropy_m{i}"].detach()) == pytest.approx(math.log(4), rel=1e-6)
        assert float(out.aux_losses[f"global_entropy_m{i}"].detach()) == 0.0  # log(4) >= tau for both modalities


def test_both_modalities_train_the_same_expert_weights():
    m = tiny(**{"encoder.moe.capacity_factor": 4.0}).train()
    experts = [mod.experts for mod in m.modules() if isinstance(mod, MoELayer)]
    assert len(experts) == 1  # one set of experts, no per-modality tower
    # every expert / router / attention parameter lives in the ONE shared encoder
    shared = {n for n, _ in m.named_parameters() if n.startswith("encoder.")}
    assert any("experts.w1" in n for n in shared) and any("router" in n for n in shared)
    assert all(n.startswith(("encoder.", "patch_embed", "image_", "token_embed", "text_", "logit_"))
               for n, _ in m.named_parameters())

    def grads(loss):
        m.zero_grad()
        loss.backward()
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in m.named_parameters()}

    g_img = grads(m(images=torch.randn(4, 3, 16, 16)).image_embeds.pow(3).sum())
    g_txt = grads(m(text=captions([5, 9, 4, 12], 16)).text_embeds.pow(3).sum())
    w1 = "encoder.blocks.1.mlp.experts.w1"
    for g in (g_img, g_txt):
        assert g[w1].abs().sum() > 0
        assert g["encoder.blocks.1.mlp.router.proj.weight"].abs().sum() > 0
        assert g["encoder.blocks.0.attn.qkv.weight"].abs().sum() > 0
    # the same expert tensor receives gradient from both the image-only and the text-only loss
    per_expert_img = g_img[w1].abs().sum((1, 2))
    per_expert_txt = g_txt[w1].abs().sum((1, 2))
    assert ((per_expert_img > 0) & (per_expert_txt > 0)).any()
    # modality-specific inputs only get their own modality's gradient
    assert g_img["token_embed.weight"].abs().sum() == 0 and g_txt["patch_embed.proj.weight"].abs().sum() == 0


@pytest.mark.parametrize("trim", [False, True])
def test_text_padding_takes_no_capacity(trim):
    """Padding the same captions to 16 or 32 tokens changes nothing for the real tokens: embeddings, top-1
    experts, kept assignments and capacity (binding here: capacity factor 0.5 drops tokens)."""
    m = tiny(context_length=32, trim_text_padding=trim,
             **{"encoder.moe.capacity_factor": 0.5, "encoder.moe.group_size": 2}).eval()
    short = captions([5, 12, 3, 8], 16)
    long = torch.cat([short, torch.zeros(4, 16, dtype=torch.long)], dim=1)
    a, b = m(text=short), m(text=long)
    torch.testing.assert_close(a.text_embeds, b.text_embeds)
    ra, rb = a.text_routing[0], b.text_routing[0]
    assert ra.capacity == rb.capacity
    assert float(ra.dropped_fraction) > 0  # capacity binds
    torch.testing.assert_close(ra.tokens_per_expert, rb.tokens_per_expert)
    valid = text_mask_from_tokens(long)
    top_a, top_b = (torch.nn.functional.pad(t, (0, 32 - t.shape[1]), value=-1) for t in (ra.top1_expert, rb.top1_expert))
    assert torch.equal(top_a, top_b)
    assert (top_b[~valid] == -1).all() and (top_b[valid] >= 0).all()
    assert float(ra.tokens_per_expert.sum()) <= int(valid.sum())  # padding took no slot


def test_capacity_from_valid_tokens_flag_matters():
    """Without the flag padding inflates capacity (V-MoE's ceil(S k cf / E) counts every position)."""
    m = tiny(context_length=32, trim_text_padding=False,
             **{"encoder.moe.capacity_factor": 0.5, "encoder.moe.capacity_from_valid_tokens": False}).eval()
    short = captions([5, 12, 3, 8], 16)
    long = torch.cat([short, torch.zeros(4, 16, dtype=torch.long)], dim=1)
    assert m(text=short).text_routing[0].capacity < m(text=long).text_routing[0].capacity


def test_pooling_options_and_sigmoid_parameters():
    for image_pool, text_pool in (("map", "map"), ("gap", "eot")):
        m = tiny(image_pool=image_pool, text_pool=text_pool, loss="sigmoid").eval()
        out = m(images=torch.randn(2, 3, 16, 16), text=captions([4, 6], 16))
        assert out.logit_bias is not None and float(out.logit_bias) == -10.0
        assert float(out.logit_scale) == pytest.approx(10.0)
        # the pair logits are scale * cos(image, text) + bias over unit-norm embeddings
        torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))
        torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(2))
        torch.testing.assert_close(out.logits, 10.0 * out.image_embeds @ out.text_embeds.t() - 10.0)


def test_patch_and_text_token_dropout_only_in_training():
    m = tiny(patch_dropout=0.5, text_token_dropout=0.5).train()
    text = captions([10, 12], 16)
    out = m(images=torch.randn(2, 3, 16, 16), text=text)
    assert out.image_routing[0].top1_expert.shape == (2, 8)  # 16 patches -> 8 kept
    routed = out.text_routing[0].top1_expert >= 0
    assert routed[:, 0].all() and routed[0, 9] and routed[1, 11]  # SOT and EOT are never dropped
    assert int(routed.sum()) < 22
    m.eval()
    out = m(images=torch.randn(2, 3, 16, 16), text=text)
    assert out.image_routing[0].top1_expert.shape == (2, 16) and int((out.text_routing[0].top1_expert >= 0).sum()) == 22


def test_mask_unseen_tokens_masks_exactly_the_words_no_training_batch_had():
    m = tiny(mask_unseen_tokens=True, text_token_dropout=0.5)
    seen_caption = captions([6], 16)       # SOT 100 101 102 103 EOT
    m.train()
    m(images=torch.randn(1, 3, 16, 16), text=seen_caption)
    expected = torch.zeros(m.config.vocab_size, dtype=torch.bool)
    expected[[SOT, EOT, 100, 101, 102, 103]] = True  # dropout does not hide a word from the record; no pad id 0
    assert torch.equal(m.seen_tokens, expected)
    assert "seen_tokens" in m.state_dict()
    m.eval()
    mixed = torch.tensor([[SOT, 100, 500, 101, 501, EOT] + [0] * 10])
    routed = m(text=mixed).text_routing[0].top1_expert[0] >= 0
    assert routed.tolist()[:6] == [True, True, False, True, False, True]  # unseen 500 / 501 masked
    # The same as masking those positions by hand; and a caption of unseen words still keeps SOT / EOT.
    by_hand = m.encode_text(mixed, mask=torch.tensor([[1, 1, 0, 1, 0, 1] + [0] * 10], dtype=torch.bool))
    assert torch.allclose(m.encode_text(mixed), by_hand, atol=1e-6)
    assert torch.isfinite(m.encode_text(torch.tensor([[SOT, 600, 601, EOT] + [0] * 12]))).all()
    # Off by default: no buffer, unseen words are encoded like any other.
    plain = tiny().eval()
    assert not hasattr(plain, "seen_tokens")
    assert int((plain(text=mixed).text_routing[0].top1_expert[0] >= 0).sum()) == 6


def test_conv_patch_stem_matches_its_definition_and_trains():
    from zoo.layers import PatchEmbed
    import torch.nn.functional as F

    torch.manual_seed(0)
    stem = PatchEmbed(16, 4, 3, 8, stem="conv").train()
    x = torch.randn(2, 3, 16, 16)
    # By hand: 3x3 stride-2 conv -> batch-statistics BN -> ReLU (widths 4 then 8), then 1x1 conv to D.
    h = x
    for conv, bn in ((stem.proj[0], stem.proj[1]), (stem.proj[3], stem.proj[4])):
        h = F.conv2d(h, conv.weight, stride=2, padding=1)
        h = F.relu(F.batch_norm(h, None, None, bn.weight, bn.bias, training=True))
    h = F.conv2d(h, stem.proj[6].weight, stem.proj[6].bias)
    assert stem.proj[0].out_channels == 4 and stem.grid == 4 and stem.num_patches == 16
    assert torch.allclose(stem(x), h.flatten(2).transpose(1, 2), atol=1e-6)
    with pytest.raises(ValueError, match="power of 2"):
        PatchEmbed(24, 6, 3, 8, stem="conv")
    with pytest.raises(ValueError, match="stem must be"):
        PatchEmbed(16, 4, 3, 8, stem="resnet")
    m = tiny(patch_stem="conv").train()
    out = m(images=torch.randn(2, 3, 16, 16), text=captions([4, 6], 16))
    assert out.image_embeds.shape == out.text_embeds.shape
    out.logits.sum().backward()
    assert m.patch_embed.proj[0].weight.grad.abs().sum() > 0
