"""Q-Formers (zoo/models/qformer.py) and CrossAttention: shapes, padded encoder frames leave outputs unchanged,
mask errors, Uni-MoE's per-window token layout."""

from __future__ import annotations

import pytest
import torch

from zoo.layers import CrossAttention
from zoo.models.audio import WhisperEncoder, WhisperEncoderConfig
from zoo.models.qformer import (Blip2QFormer, Blip2QFormerConfig, SpeechConnector, WhisperQFormer,
                                WhisperQFormerConfig, encode_speech)

D, Q, S, PAD = 32, 6, 10, 7


def whisper_qformer_cfg(**kw) -> WhisperQFormerConfig:
    return WhisperQFormerConfig(dim=D, depth=2, num_heads=4, mlp_dim=64, num_queries=Q, **kw)


def blip2_cfg() -> Blip2QFormerConfig:
    return Blip2QFormerConfig(dim=D, depth=3, num_heads=4, mlp_dim=64, encoder_dim=48, num_queries=Q)


def padded(enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``enc`` followed by PAD frames of large junk, and the mask that marks them padded."""
    B = enc.shape[0]
    junk = 100 * torch.randn(B, PAD, enc.shape[-1])
    mask = torch.cat([torch.ones(B, S, dtype=torch.bool), torch.zeros(B, PAD, dtype=torch.bool)], dim=1)
    return torch.cat([enc, junk], dim=1), mask


def test_cross_attention_shapes_and_padding():
    torch.manual_seed(0)
    layer = CrossAttention(D, 4, context_dim=48).eval()
    x, ctx = torch.randn(2, Q, D), torch.randn(2, S, 48)
    out = layer(x, ctx)
    assert out.shape == (2, Q, D)
    ctx_pad, mask = padded(ctx)
    torch.testing.assert_close(layer(x, ctx_pad, mask), out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(layer(x, ctx_pad), out, atol=1e-3)  # without the mask the junk frames do matter


def test_whisper_qformer_shapes_and_padding_mask():
    torch.manual_seed(0)
    qf = WhisperQFormer(whisper_qformer_cfg()).eval()
    queries, enc = torch.randn(2, Q, D), torch.randn(2, S, D)
    out = qf(queries, enc)
    assert out.shape == (2, Q, D)
    enc_pad, mask = padded(enc)
    torch.testing.assert_close(qf(queries, enc_pad, mask), out, atol=1e-5, rtol=1e-5)
    # Rows are independent: a second row with fewer real frames gives the same result as that row alone.
    mask2 = mask.clone()
    mask2[1, 4:] = False
    both = qf(queries, enc_pad, mask2)
    alone = qf(queries[1:], enc[1:, :4])
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)
    # Causal among the queries (the Whisper decoder's self-attention): query 0 does not see later queries.
    changed = queries.clone()
    changed[:, -1] += torch.randn(D)  # not a constant shift: LayerNorm would remove that
    torch.testing.assert_close(qf(changed, enc)[:, :-1], out[:, :-1], atol=1e-5, rtol=1e-5)


def test_speech_connector_shapes_and_uni_moe_token_layout():
    torch.manual_seed(0)
    encoder = WhisperEncoder(WhisperEncoderConfig(dim=D, depth=1, num_heads=4, mlp_dim=64)).eval()
    conn = SpeechConnector(whisper_qformer_cfg(), lm_dim=40, projector="mlp2x_gelu").eval()
    assert conn.num_queries == Q and not conn.query_tokens.detach().any()  # zeros at init, as official
    feats = torch.randn(3, 80, 3000)  # three 30 s windows of one clip
    tokens = encode_speech(encoder, conn, feats)
    assert tokens.shape == (3 * Q, 40)
    # Window order is kept: tokens of window 1 are those of window 1 encoded alone.
    torch.testing.assert_close(tokens[Q:2 * Q], conn(encoder(feats[1:2]))[0], atol=1e-5, rtol=1e-5)
    assert WhisperQFormerConfig.preset("whisper-small").num_queries == 50


def test_blip2_qformer_shapes_and_padding_mask():
    torch.manual_seed(0)
    qf = Blip2QFormer(blip2_cfg()).eval()
    assert [b.cross is not None for b in qf.blocks] == [True, False, True]
    enc = torch.randn(2, S, 48)
    out = qf(enc)
    assert out.shape == (2, Q, D)
    enc_pad, mask = padded(enc)
    torch.testing.assert_close(qf(enc_pad, mask), out, atol=1e-5, rtol=1e-5)


def test_mask_and_shape_errors():
    qf = WhisperQFormer(whisper_qformer_cfg())
    queries, enc = torch.randn(2, Q, D), torch.randn(2, S, D)
    with pytest.raises(ValueError, match="no real frame"):
        qf(queries, enc, torch.zeros(2, S, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"encoder_mask must be \[B, S\]"):
        qf(queries, enc, torch.ones(2, S + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="encoder output"):
        qf(queries, torch.randn(2, S, D + 1))
    with pytest.raises(ValueError, match="num_queries"):
        WhisperQFormerConfig(dim=D, depth=1, num_heads=4, mlp_dim=64, num_queries=449)
