"""The real-size Uni-MoE audio-variant preset ``uni_moe_audio_base_7b_4e``, built on the meta device only (13.7B
parameters: never instantiated for real). Expected numbers are derived from the official code's shapes:
LLaMA-7B (Vicuna v1.5: vocab 32000, 4096 wide, 32 blocks, 32 heads, SwiGLU 11008, untied head) with a 4-expert MoE FFN
(+ router ``[4, 4096]``) in the even blocks only (``LlamaDecoderLayer``: ``moe`` set and ``layer % 2 == 0``);
BEATs iter3 (the released iter3 / iter3+ cfg as recorded in ``zoo.models.beats.BEATsConfig``; the release uses
``BEATs_iter3_plus_AS2M.pt``: patch 16, 512 -> 768, 12 blocks, 12 heads, FFN 3072, conv_pos 128 / 16 groups, 320
buckets, gated relative position bias); the aligner's ``Blip2QFormerModel`` from ``Blip2Config()`` defaults (768,
12 layers, 12 heads, 3072, cross-attention every 2nd layer, encoder width 768) with ``query_tokens_size`` 50 (the
training default) queries, ``linear`` aligner projector (``audio_projector_type`` default); CLIP ViT-L/14-336 +
``mlp2x_gelu`` (``finetune_audio.sh``)."""

from __future__ import annotations

import pytest

import zoo
from zoo.convert.empty_init import init_empty

H, V, L, FF, E = 4096, 32000, 32, 11008, 4


@pytest.fixture(scope="module")
def model():
    return init_empty(lambda: zoo.create_model("uni_moe_audio_base_7b_4e"))


def _count(model, prefix: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def test_all_parameters_on_meta(model):
    assert all(p.device.type == "meta" for p in model.parameters())


def test_decoder_parameter_count(model):
    attn = 4 * H * H + 2 * H  # q, k, v, o + the two RMSNorms
    dense = 3 * H * FF
    moe = E * dense + E * H  # experts + router
    expected = 2 * V * H + 16 * (attn + moe) + 16 * (attn + dense) + H
    assert _count(model, "decoder.") == expected == 13_231_460_352
    cfg = model.config.decoder
    assert tuple(cfg.moe_layers) == tuple(range(0, 32, 2)) and cfg.moe.num_experts == E and cfg.moe.top_k == 2
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["decoder.blocks.0.mlp.experts.w1"] == (E, H, 2 * FF)
    assert shapes["decoder.blocks.0.mlp.router.proj.weight"] == (E, H)
    assert shapes["decoder.blocks.1.mlp.fc1.weight"] == (2 * FF, H) and "decoder.blocks.1.mlp.router.proj.weight" \
        not in shapes


def test_beats_iter3_parameter_count(model):
    D, P, F = 768, 512, 3072
    layer = 4 * (D * D + D) + (64 * 8 + 8) + 12 + 2 * D + (D * F + F) + (F * D + D) + 2 * D  # attn, gru gate, ffn
    expected = P * 16 * 16 + 2 * P + (P * D + D) + D * (D // 16) * 128 + 128 + D + 2 * D + 320 * 12 + 12 * layer
    assert _count(model, "audio_encoder.") == expected == 90_311_792
    assert model.config.audio_beats_window == 480000 and model.config.audio_beats_mask_padding is False


def test_blip2_aligner_parameter_count(model):
    D, F, Q = 768, 3072, 50
    self_block = 4 * (D * D + D) + 2 * D + (D * F + F) + (F * D + D) + 2 * D
    cross = 4 * (D * D + D) + 2 * D
    assert _count(model, "audio_connector.qformer.") == Q * D + 2 * D + 12 * self_block + 6 * cross == 99_277_824
    assert _count(model, "audio_connector.projector.") == D * H + H
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["audio_connector.qformer.query_tokens"] == (1, Q, D)
    assert shapes["audio_connector.qformer.blocks.0.cross.kv.weight"] == (2 * D, D)
    assert "audio_connector.qformer.blocks.1.cross.q.weight" not in shapes


def test_vision_side(model):
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["vision_tower.pos_embed"] == (1, 577, 1024)
    assert _count(model, "projector.") == (1024 * H + H) + (H * H + H)
    assert _count(model, "") == 13_748_686_960


def test_converter_constants_match_the_preset(model):
    """The converter's fixed Q-Former settings (not stored in official checkpoints) are the preset's."""
    from zoo.convert.uni_moe_audio import QFORMER_CROSS_EVERY, QFORMER_EPS, QFORMER_HEADS, WINDOW_SAMPLES

    b = model.config.audio_blip2
    assert (b.num_heads, b.cross_attention_every, b.norm_eps) == (QFORMER_HEADS, QFORMER_CROSS_EVERY, QFORMER_EPS)
    assert model.config.audio_beats_window == WINDOW_SAMPLES
