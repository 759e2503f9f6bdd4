"""``UniMoEConfig.audio_beats_window`` / ``audio_beats_mask_padding``: the official audio variant's 30 s windows
(last one padded with copies of its last sample, Q tokens per window, in order) and its unmasked Q-Former padding.
Parity with the official code itself: ``tests/convert/test_uni_moe_audio_convert.py``."""

from __future__ import annotations

import pytest
import torch

import zoo

W = 8000


def _tokens(model, wave, lengths):
    return model.encode_audio(wave, torch.tensor(lengths))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return zoo.create_model("uni_moe_audio_tiny", audio_beats_window=W, audio_beats_mask_padding=False).eval()


def test_windows_are_encoded_one_by_one_and_concatenated(model):
    """A 1.5-window clip gives 2 x Q tokens: window 1 as a clip of its own, then the 0.5-window rest (padded the
    official way) as a clip of its own; batch neighbours change nothing."""
    g = torch.Generator().manual_seed(1)
    wave = 0.1 * torch.randn(2, 12000, generator=g)
    Q = model.audio_connector.num_queries
    with torch.no_grad():
        both = _tokens(model, wave, [12000, 3000])
        first = _tokens(model, wave[:1, :W], [W])[0]
        rest = _tokens(model, wave[:1, W:], [4000])[0]
        alone = _tokens(model, wave[1:], [3000])[0]
    assert both[0].shape == (2 * Q, model.config.decoder.dim) and both[1].shape == (Q, model.config.decoder.dim)
    torch.testing.assert_close(both[0], torch.cat([first, rest]), atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], alone, atol=1e-5, rtol=0)


def test_padding_is_copies_of_the_last_sample(model):
    """The padded window equals a full window whose tail is the last real sample repeated (masked in BEATs)."""
    g = torch.Generator().manual_seed(2)
    wave = 0.1 * torch.randn(1, 2500, generator=g)
    full = torch.cat([wave, wave[:, -1:].expand(1, W - 2500)], dim=1)
    padding = torch.arange(W)[None, :] >= 2500
    with torch.no_grad():
        short = _tokens(model, wave, [2500])[0]
        feats, token_padding = model.audio_encoder.extract_features(full, 16000, padding)
        padded = model.audio_connector(feats, None)[0]  # official: no mask for the Q-Former
        unpadded = model.audio_connector(model.audio_encoder.extract_features(full, 16000)[0], None)[0]
    assert token_padding.any()
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=0)
    assert (short - unpadded).abs().max() > 1e-4  # the padding mask inside BEATs matters


def test_masking_the_padding_changes_the_tokens(model):
    g = torch.Generator().manual_seed(3)
    wave = 0.1 * torch.randn(1, 2500, generator=g)
    with torch.no_grad():
        official = _tokens(model, wave, [2500])[0]
        model.config.audio_beats_mask_padding = True
        try:
            masked = _tokens(model, wave, [2500])[0]
        finally:
            model.config.audio_beats_mask_padding = False
    assert (official - masked).abs().max() > 1e-4


def test_window_must_hold_a_frame():
    with pytest.raises(ValueError, match="audio_beats_window=10 samples is shorter than one BEATs patch"):
        zoo.create_model("uni_moe_audio_tiny", audio_beats_window=10)
