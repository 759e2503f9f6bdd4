"""The Uni-MoE model (tiny preset, random weights): image / video / speech / text samples in one batch, each medium
spliced where its placeholder is with its modality id, a long clip's 30 s windows in order, causal routing, freeze
groups, and bad inputs."""

import math

import pytest
import torch

import zoo
from zoo.models.multimodal import AUDIO, IMAGE, TEXT, VIDEO
from zoo.models.uni_moe import AUDIO_TOKEN_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return zoo.create_model("uni_moe_tiny").eval()


def _tone(seconds, freq=440.0):
    t = torch.arange(int(16000 * seconds)) / 16000
    return torch.sin(2 * math.pi * freq * t)


def test_placeholder_ids_match_the_data_contract():
    from zoo.data import templates

    assert (IMAGE_TOKEN_ID, AUDIO_TOKEN_ID, VIDEO_TOKEN_ID) == (templates.IMAGE_TOKEN_ID, templates.AUDIO_TOKEN_ID,
                                                                templates.VIDEO_TOKEN_ID)


def test_mixed_batch_splices_every_medium_with_its_modality(model):
    Q = model.config.audio_qformer.num_queries
    S = model.config.vision.image_size
    N = 16  # (32 / 8)^2 patch tokens
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, 6], [5, AUDIO_TOKEN_ID, 6], [5, VIDEO_TOKEN_ID, 6], [5, 6, 7]])
    torch.manual_seed(1)
    images, video = torch.randn(4, 3, S, S), torch.randn(4, 3, 3, S, S)
    long_clip = _tone(40.0)  # two 30 s windows -> 2 Q tokens
    audio = torch.zeros(4, len(long_clip))
    audio[1] = long_clip
    lengths = torch.tensor([0, len(long_clip), 0, 0])
    with torch.no_grad():
        out = model(ids, images=images, video=video, audio=audio, audio_lengths=lengths)
    counts = out.attention_mask.sum(1).tolist()
    assert counts == [2 + N, 2 + 2 * Q, 2 + N, 3]
    assert out.logits.shape[:2] == (4, 2 + 2 * Q)
    assert (out.modality[0, 1:1 + N] == IMAGE).all() and (out.modality[1, 1:1 + 2 * Q] == AUDIO).all()
    assert (out.modality[2, 1:1 + N] == VIDEO).all() and (out.modality[3, :3] == TEXT).all()
    # the clip's windows in order: the first Q tokens are the first window's
    with torch.no_grad():
        first = model(ids[1:2], audio=long_clip[None, :16000 * 30], audio_lengths=torch.tensor([16000 * 30]))
    torch.testing.assert_close(out.logits[1, :1 + Q], first.logits[0, :1 + Q], rtol=0, atol=1e-5)


def test_video_pools_frames_or_keeps_them(model):
    S = model.config.vision.image_size
    video = torch.randn(1, 3, 3, S, S)
    with torch.no_grad():
        pooled = model.encode_video(video)
        frames = model.encode_images(video[0])
    torch.testing.assert_close(pooled[0], frames.mean(0), rtol=0, atol=1e-6)
    torch.manual_seed(0)
    keep = zoo.create_model("uni_moe_tiny", video_frames_as_tokens=True, max_video_frames=2).eval()
    with torch.no_grad():
        assert keep.encode_video(video).shape[1] == 2 * frames.shape[1]


def test_routing_is_causal_and_audio_features_input_equals_waveform_input(model):
    ids = torch.randint(3, 60, (1, 10))
    ids[0, 1] = AUDIO_TOKEN_ID
    changed = ids.clone()
    changed[0, 7:] = torch.randint(3, 60, (3,))
    clip = _tone(1.0)[None]
    with torch.no_grad():
        a = model(ids, audio=clip).logits
        b = model(changed, audio=clip).logits
        keep = 6 + model.config.audio_qformer.num_queries
        assert torch.equal(a[:, :keep], b[:, :keep]) and not torch.equal(a, b)
        feats = zoo.models.audio_features(clip[0], 16000)[None]  # [1, C=1, 80, 3000]
        torch.testing.assert_close(model(ids, audio=feats).logits, a, rtol=0, atol=1e-6)


def test_freeze_groups_cover_the_speech_side(model):
    from zoo.models.freeze import param_groups

    groups = param_groups(model)
    names = {n for g in groups.values() for n, _ in g}
    assert names == {n for n, _ in model.named_parameters()}  # every parameter is in some group
    assert not any(p.requires_grad for p in model.audio_encoder.parameters())
    assert all(p.requires_grad for p in model.audio_connector.parameters())
    assert {n for n, _ in groups["audio_tower"]} == {f"audio_encoder.{n}" for n, _ in model.audio_encoder.named_parameters()}
    assert {n for n, _ in groups["audio_connector"]} == {f"audio_connector.{n}"
                                                         for n, _ in model.audio_connector.named_parameters()}
    # LoRA experts (stage 3): the lora group holds only the low-rank factors, the shared base stays in experts
    from zoo.moe import LoRAExperts

    m = zoo.create_model("uni_moe_tiny")
    layer = m.decoder.blocks[0].mlp
    e = layer.experts
    layer.experts = LoRAExperts(e.num_experts, e.dim, e.hidden_dim, "swiglu", r=2, alpha=4)
    g = param_groups(m)
    assert {n for n, _ in g["lora"]} == {f"decoder.blocks.0.mlp.experts.lora_{x}" for x in ("a1", "b1", "a2", "b2")}
    assert {"decoder.blocks.0.mlp.experts.w1", "decoder.blocks.0.mlp.experts.w2"} <= {n for n, _ in g["experts"]}


def test_bad_inputs_get_clear_errors(model):
    ids = torch.tensor([[5, AUDIO_TOKEN_ID, 6]])
    with pytest.raises(ValueError, match="placeholder"):
        model(ids, audio=torch.zeros(1, 100), audio_lengths=torch.tensor([0]))  # an empty clip for a placeholder
    with pytest.raises(ValueError, match="waveforms"):
        model(ids, audio=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="mel bins"):
        model(ids, audio=torch.zeros(1, 1, 128, 3000))
    no_audio = zoo.create_model("uni_moe_tiny", audio_encoder=None, audio_qformer=None)
    with pytest.raises(ValueError, match="no audio encoder"):
        no_audio(ids, audio=_tone(1.0)[None])


def test_generate_answers_a_spoken_prompt_deterministically(model):
    ids = torch.tensor([[5, AUDIO_TOKEN_ID, 6], [0, 7, 8]])  # row 1: left-padded text only
    mask = torch.tensor([[True, True, True], [False, True, True]])
    clip = torch.zeros(2, 16000)
    clip[0] = _tone(1.0)
    lengths = torch.tensor([16000, 0])
    a = model.generate(ids, attention_mask=mask, audio=clip, audio_lengths=lengths, max_new_tokens=4)
    b = model.generate(ids, attention_mask=mask, audio=clip, audio_lengths=lengths, max_new_tokens=4)
    assert a.shape == (2, 4) and torch.equal(a, b)
    alone = model.generate(ids[1:, 1:], max_new_tokens=4)  # a sequence's answer does not depend on the batch
    assert torch.equal(alone[0], a[1])


def test_a_batch_of_clips_encodes_as_each_clip_alone(model):
    """encode_audio runs every clip's windows through one log-mel, encoder and connector call: the tokens of each
    clip equal that clip encoded alone (a 31 s clip = 2 windows, a clip-less sample, a short one)."""
    clips = [_tone(31.0, 300.0), torch.zeros(0), _tone(0.7, 500.0)]
    lengths = torch.tensor([c.numel() for c in clips])
    batch = torch.zeros(3, int(lengths.max()))
    for b, c in enumerate(clips):
        batch[b, :c.numel()] = c
    with torch.no_grad():
        together = model.encode_audio(batch, lengths)
        alone = [model.encode_audio(c[None])[0] for c in (clips[0], clips[2])]
    q = model.config.audio_qformer.num_queries
    assert together[1] is None and together[0].shape[0] == 2 * q and together[2].shape[0] == q
    torch.testing.assert_close(together[0], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(together[2], alone[1], rtol=0, atol=1e-5)


def test_blip2_audio_connector_variant():
    """The audio variant's aligner (a BLIP-2 Q-Former, ``audio_blip2``) in place of the Whisper-decoder Q-Former:
    Q tokens per window spliced at ``<audio>``, depending on the clip, trained as the ``audio_connector`` group;
    contradictory configs are refused."""
    from zoo.models.freeze import param_groups
    from zoo.models.qformer import Blip2AudioConnector

    blip2 = dict(dim=32, depth=2, num_heads=2, mlp_dim=64, encoder_dim=32, num_queries=6)
    torch.manual_seed(0)
    m = zoo.create_model("uni_moe_tiny", audio_qformer=None, audio_blip2=blip2).eval()
    assert isinstance(m.audio_connector, Blip2AudioConnector) and m.audio_connector.num_queries == 6
    with torch.no_grad():
        m.audio_connector.qformer.query_tokens.normal_()  # zero at init (official); any values from here on
    ids = torch.tensor([[5, AUDIO_TOKEN_ID, 6], [5, AUDIO_TOKEN_ID, 6]])
    clips = torch.stack([_tone(1.0, 300.0), _tone(1.0, 900.0)])
    with torch.no_grad():
        out = m(ids, audio=clips)
    assert out.logits.shape[1] == 2 + 6 and (out.modality[:, 1:7] == AUDIO).all()
    assert not torch.allclose(out.logits[0, 1:7], out.logits[1, 1:7])  # the tokens carry the clip
    groups = {n for n, _ in param_groups(m)["audio_connector"]}
    assert groups == {f"audio_connector.{n}" for n, _ in m.audio_connector.named_parameters()}
    with pytest.raises(ValueError, match="two choices of the audio connector"):
        zoo.create_model("uni_moe_tiny", audio_blip2=blip2)
    with pytest.raises(ValueError, match="encoder_dim"):
        zoo.create_model("uni_moe_tiny", audio_qformer=None, audio_blip2={**blip2, "encoder_dim": 16})


def test_beats_audio_variant():
    """The official audio variant's encoder (BEATs, ``audio_beats``) with the BLIP-2 connector: one clip = Q tokens
    at its ``<audio>`` (no 30 s windows), a sample without a clip gets none, a clip's tokens do not depend on the
    other clips of its batch (only, as in the official BEATs, on the padded length: a partly padded last patch),
    log-mel input and contradictory configs refused."""
    beats = dict(embed_dim=48, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_layers=2,
                 encoder_attention_heads=4, conv_pos=16, conv_pos_groups=4)
    blip2 = dict(dim=32, depth=2, num_heads=2, mlp_dim=64, encoder_dim=64, num_queries=5)
    torch.manual_seed(0)
    m = zoo.create_model("uni_moe_tiny", audio_encoder=None, audio_qformer=None, audio_beats=beats,
                         audio_blip2=blip2).eval()
    with torch.no_grad():
        m.audio_connector.qformer.query_tokens.normal_()
    short, long = _tone(0.5, 300.0), _tone(1.5, 700.0)
    batch = torch.zeros(3, long.numel())
    batch[0, :short.numel()], batch[2] = short, long
    lengths = torch.tensor([short.numel(), 0, long.numel()])
    other = batch.clone()
    other[2] = _tone(1.5, 1100.0)
    with torch.no_grad():
        tokens = m.encode_audio(batch, lengths)
        tokens_other = m.encode_audio(other, lengths)
    assert tokens[1] is None and tokens[0].shape == tokens[2].shape == (5, m.config.decoder.dim)
    torch.testing.assert_close(tokens_other[0], tokens[0], rtol=0, atol=1e-6)  # the partner clip changed only itself
    assert not torch.allclose(tokens_other[2], tokens[2], atol=1e-3)
    ids = torch.tensor([[5, AUDIO_TOKEN_ID, 6]])
    with torch.no_grad():
        out = m(ids, audio=short[None])
    assert out.logits.shape[1] == 2 + 5 and (out.modality[0, 1:6] == AUDIO).all()
    with pytest.raises(ValueError, match="not log-mel windows"):
        m(ids, audio=torch.zeros(1, 1, 128, 3000))
    with pytest.raises(ValueError, match="two choices of the audio encoder"):
        zoo.create_model("uni_moe_tiny", audio_beats=beats, audio_qformer=None, audio_blip2=blip2)


def test_audio_variant_preset_trains_its_beats_tower_when_named():
    """``uni_moe_audio_tiny`` (BEATs + BLIP-2 aligner): a training step reaches the BEATs tower when the freeze
    spec names ``audio_tower`` and leaves it untouched (no autograd graph) when it does not."""
    from zoo.models.freeze import apply_freeze

    ids = torch.tensor([[5, AUDIO_TOKEN_ID, 6, 7]])
    clip = _tone(1.0, 440.0)[None]
    for trainable, reaches in ((["audio_tower", "audio_connector"], True), (["audio_connector"], False)):
        torch.manual_seed(0)
        m = zoo.create_model("uni_moe_audio_tiny").train()
        apply_freeze(m, trainable)
        out = m(ids, audio=clip, labels=ids)
        out.loss.backward()
        grads = [p.grad for p in m.audio_encoder.parameters()]
        assert all(g is not None for g in grads) == reaches and any(g is not None for g in grads) == reaches
        assert all(p.grad is not None for p in m.audio_connector.parameters() if p.requires_grad)


def test_short_audio_windows_cut_clips_into_chunks_in_order():
    """``audio_window_seconds``: a clip longer than the window gives one Q-token chunk per window, each the same as
    encoding that window's audio alone; a window the encoder cannot hold is refused when the config is built."""
    torch.manual_seed(0)
    model = zoo.create_model("uni_moe_tiny", audio_window_seconds=1.0).eval()
    Q = model.config.audio_qformer.num_queries
    clip = _tone(2.5, 300.0) * torch.linspace(0.1, 1.0, 40_000)  # 3 windows of 16,000 samples (stride 16,001)
    with torch.no_grad():
        (tokens,) = model.encode_audio(clip[None])
        assert tokens.shape[0] == 3 * Q
        for w, start in enumerate((0, 16_001, 32_002)):
            (alone,) = model.encode_audio(clip[None, start:start + 16_000])
            torch.testing.assert_close(tokens[w * Q:(w + 1) * Q], alone, rtol=1e-5, atol=1e-5)
        (thirty,) = zoo.create_model("uni_moe_tiny").eval().encode_audio(clip[None])
    assert thirty.shape[0] == Q  # the default: one 30 s window
    with pytest.raises(ValueError, match="0.02 s"):
        zoo.create_model("uni_moe_tiny", audio_window_seconds=0.01)
    too_long = zoo.create_model("uni_moe_tiny", audio_window_seconds=31.0)  # beyond the encoder's 1500 positions
    with pytest.raises(ValueError, match="max_positions"):
        too_long.encode_audio(clip[None])
