"""BEATs encoder (zoo/models/beats.py) and its official-checkpoint loader (zoo/convert/beats.py) against outputs of
Microsoft's official BEATs code (tests/fixtures/beats_official, see its README): fbank, features, padded features;
shapes; input errors; loader errors; and that the fixture notices each part of the model being wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo.convert.beats import BEATsCheckpointError, load_beats
from zoo.models.beats import (BEATsConfig, BEATsEncoder, beats_fbank, min_samples, relative_position_buckets)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "beats_official"
ATOL = 1e-5


@pytest.fixture(scope="module")
def official():
    meta = json.loads((FIXTURE / "config.json").read_text())
    return meta["official_config"], load_file(str(FIXTURE / "beats_tiny.safetensors")), \
        load_file(str(FIXTURE / "io.safetensors"))


@pytest.fixture(scope="module")
def model(official):
    cfg, sd, _ = official
    return load_beats({"cfg": cfg, "model": sd})


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_fbank_matches_official(official):
    _, _, io = official
    fbank = beats_fbank(io["waveform"])
    assert fbank.shape == io["fbank"].shape == (2, 198, 128)
    assert _max_diff(fbank, io["fbank"]) <= ATOL


def test_features_match_official(model, official):
    _, _, io = official
    with torch.no_grad():
        out, mask = model.extract_features(io["waveform"], sample_rate=16_000)
    assert mask is None
    assert out.shape == io["features"].shape == (2, 96, 64)
    assert _max_diff(out, io["features"]) <= ATOL


def test_padded_features_match_official(model, official):
    _, _, io = official
    with torch.no_grad():
        out, mask = model.extract_features(io["waveform"], padding_mask=io["padding_mask"])
    assert torch.equal(mask, io["padding_mask_out"])
    assert mask[0].sum() == 0 and mask[1].sum() > 0
    assert _max_diff(out, io["features_masked"]) <= ATOL
    # The padding changes clip 1 only.
    assert _max_diff(out[0], io["features"][0]) <= ATOL
    assert _max_diff(out[1], io["features"][1]) > 1e-3


def test_bare_state_dict_infers_config(model, official):
    cfg, sd, io = official
    inferred = load_beats(sd)
    assert inferred.cfg == model.cfg
    with torch.no_grad():
        assert _max_diff(inferred(io["waveform"]), io["features"]) <= ATOL


def test_shapes_and_token_count(model):
    torch.manual_seed(1)
    for samples in (min_samples(), 16_000, 16_000 + 1234):
        wav = 0.1 * torch.randn(3, samples)
        with torch.no_grad():
            out = model(wav)
        assert out.shape == (3, model.num_tokens(samples), 64)
        assert torch.isfinite(out).all()
    with torch.no_grad():
        one = model(0.1 * torch.randn(16_000))  # a single clip [T]
    assert one.shape == (1, model.num_tokens(16_000), 64)
    assert model.num_tokens(min_samples()) == 8 and model.num_tokens(min_samples() - 1 + 160) == 8


def test_released_config_sizes():
    cfg = BEATsConfig()  # BEATs iter3 (90M): E=512 -> D=768, 12 layers
    assert (cfg.embed_dim, cfg.encoder_embed_dim, cfg.encoder_layers, cfg.max_distance) == (512, 768, 12, 800)
    official = BEATsConfig.from_official({"input_patch_size": 16, "deep_norm": True, "gru_rel_pos": True,
                                          "relative_position_embedding": True, "max_distance": 800,
                                          "dropout": 0.1, "encoder_layerdrop": 0.05, "finetuned_model": True})
    assert official == BEATsConfig()


def test_relative_position_buckets():
    b = relative_position_buckets(1, 2000, num_buckets=320, max_distance=800)[0]
    assert b[0] == 0 and b[1] == 161 and b[79] == 160 + 79  # exact below 80, keys after the query in the top half
    assert b[80] >= 160 + 80 and b[1999] == 319  # logarithmic, then clipped at the last bucket
    assert (b[1:].diff() >= 0).all()
    back = relative_position_buckets(2000, 1, num_buckets=320, max_distance=800)[:, 0]
    assert back[1] == 1 and back[1999] == 159


@pytest.mark.parametrize("kwargs, match", [
    (dict(sample_rate=44_100), "sample rate 44100 Hz.*16000 Hz"),
    (dict(audio=torch.zeros(2, 0)), "empty"),
    (dict(audio=torch.zeros(0, 16_000)), "0 clips"),
    (dict(audio=torch.zeros(1, 2000)), "at least 2800"),
    (dict(audio=torch.zeros(1, 16_000, dtype=torch.int16)), "int16 / 32768"),
    (dict(audio=torch.full((1, 16_000), float("nan"))), "NaN"),
    (dict(audio=torch.zeros(1, 2, 16_000)), "mono"),
    (dict(padding_mask=torch.zeros(1, 100, dtype=torch.bool)), "padding_mask must be bool"),
])
def test_bad_input_errors(model, kwargs, match):
    call = dict(audio=torch.zeros(1, 16_000), sample_rate=16_000, padding_mask=None) | kwargs
    with pytest.raises(ValueError, match=match):
        model(call["audio"], sample_rate=call["sample_rate"], padding_mask=call["padding_mask"])


def test_loader_errors(official):
    cfg, sd, _ = official
    with pytest.raises(BEATsCheckpointError, match="unknown tensors.*encoder.extra"):
        load_beats({"cfg": cfg, "model": sd | {"encoder.extra": torch.zeros(1)}})
    missing = {k: v for k, v in sd.items() if k != "encoder.layers.1.fc2.bias"}
    with pytest.raises(BEATsCheckpointError, match=r"missing \['blocks.1.mlp.fc2.bias'\]"):
        load_beats({"cfg": cfg, "model": missing})
    rel = "encoder.layers.1.self_attn.relative_attention_bias.weight"
    with pytest.raises(BEATsCheckpointError, match="shares one relative position table"):
        load_beats({"cfg": cfg, "model": sd | {rel: sd[rel] + 1}})
    with pytest.raises(BEATsCheckpointError, match="does not fit"):
        load_beats({"cfg": cfg | {"encoder_ffn_embed_dim": 256}, "model": sd})
    # A fine-tuned checkpoint's classifier is not part of the encoder.
    load_beats({"cfg": cfg, "model": sd | {"predictor.weight": torch.zeros(527, 64)}})


def _mutate(name, model):
    if name == "no_relative_position_bias":
        model.rel_pos_bias.weight.data.zero_()
    elif name == "no_gate":
        for blk in model.blocks:
            blk.attn.gated = False
    elif name == "no_deep_norm_alpha":
        for blk in model.blocks:
            blk.alpha = 1.0
    elif name == "no_pos_conv":
        model.pos_conv.weight_g.data.zero_()
        model.pos_conv.bias.data.zero_()
    elif name == "frequency_major_tokens":
        orig = model.patch_norm.forward
        model.patch_norm.forward = lambda x: orig(x.view(x.shape[0], -1, 8, x.shape[-1]).transpose(1, 2)
                                                  .reshape(x.shape))


@pytest.mark.parametrize("name", ["no_relative_position_bias", "no_gate", "no_deep_norm_alpha", "no_pos_conv",
                                  "frequency_major_tokens"])
def test_fixture_catches_mutation(official, name):
    cfg, sd, io = official
    mutant = load_beats({"cfg": cfg, "model": sd})
    _mutate(name, mutant)
    with torch.no_grad():
        assert _max_diff(mutant(io["waveform"]), io["features"]) > 100 * ATOL
