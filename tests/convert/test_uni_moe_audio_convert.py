"""``python -m zoo.convert uni-moe`` on the official Uni-MoE AUDIO variant (BEATs + BLIP-2 Q-Former aligner, MoE in the
even LLaMA layers): logits equal to the OFFICIAL model's.

The fixture (``tests/fixtures/uni_moe_audio_official``, its README has every detail) was made by running the official
``Uni_MoE_audio`` code (HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs at f5e82dd, transformers 4.31.0) on CPU in fp32
with a tiny random config and saving through the official ``safe_save_all_for_hf_trainer``. The official pipeline cuts
audio into 480000-sample windows; the fixture used 8000-sample windows (same code path, smaller files), so the
converted model is loaded with ``audio_beats_window=8000``. Measured max abs logit difference at the real positions:
~9e-8 (image), ~1.0e-7 (audio: one clip of 1.5 windows, one of exactly 1), ~7e-8 (text); target 1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo.convert.hf_files import HFCheckpointError
from zoo.convert.uni_moe import build_uni_moe, read_uni_moe
from zoo.convert.uni_moe_audio import WINDOW_SAMPLES, is_audio_variant

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "uni_moe_audio_official"
CKPT = FIXTURE / "checkpoint"
CLIP = FIXTURE / "openai" / "clip-vit-tiny-random"
BEATS = FIXTURE / "beats_tiny.pt"
WINDOW = 8000  # the fixture's window (reference_meta.json "window_samples")
BATCHES = ("image", "audio", "text")


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module")
def converted(convert_cli):
    """The fixture converted through the command line and loaded back with ``zoo.create_model("local-dir:...")``."""
    import zoo

    out = convert_cli("uni_moe_audio", "uni-moe", "--checkpoint", str(CKPT), "--vision-tower", str(CLIP),
                      "--audio-tower", str(BEATS))
    saved = json.loads((out / "config.json").read_text())
    assert saved["family"] == "uni_moe"
    assert json.loads((FIXTURE / "reference_meta.json").read_text())["window_samples"] == WINDOW
    return zoo.create_model(f"local-dir:{out}", audio_beats_window=WINDOW).eval()


def _forward(model, ref, batch):
    kwargs = {}
    if batch == "image":  # images[b] belongs to sample b; sample 1 has no placeholder, so its image is unused
        kwargs["images"] = ref["image_images"]
    if batch == "audio":
        kwargs["audio"], kwargs["audio_lengths"] = ref["audio_waveform"], ref["audio_audio_lengths"]
    with torch.no_grad():
        return model(input_ids=ref[f"{batch}_input_ids"], attention_mask=ref[f"{batch}_attention_mask"],
                     labels=ref[f"{batch}_labels"], **kwargs)


def _max_diff(out, ref, batch) -> float:
    want, mask = ref[f"{batch}_logits"], ref[f"{batch}_spliced_attention_mask"]
    S = out.logits.shape[1]
    assert S <= want.shape[1] and out.logits.shape[::2] == want.shape[::2]
    assert torch.equal(out.attention_mask.bool(), mask[:, :S]), "real positions differ from the official layout"
    assert not mask[:, S:].any(), "the official sequence has real tokens past the zoo's"
    return (out.logits - want[:, :S]).abs()[mask[:, :S]].max().item()


@pytest.mark.parametrize("batch", BATCHES)
def test_logits_match_official(converted, reference, batch):
    """Logits at every real position of the official spliced sequence equal the official ones (<= 1e-4; measured
    ~1e-7), with the same real positions, the same labels there, and the same loss."""
    ref = reference
    out = _forward(converted, ref, batch)
    diff = _max_diff(out, ref, batch)
    assert diff <= 1e-4, f"{batch}: max abs logit diff {diff:.2e}"
    S = out.logits.shape[1]
    mask = ref[f"{batch}_spliced_attention_mask"][:, :S]
    assert torch.equal(out.labels[out.attention_mask.bool()], ref[f"{batch}_spliced_labels"][:, :S][mask])
    meta = json.loads((FIXTURE / "reference_meta.json").read_text())
    assert out.loss.item() == pytest.approx(meta[batch]["loss"], abs=1e-4)


def test_audio_tokens_match_official_embeddings(converted, reference):
    """The spliced audio inputs (BEATs per window -> Q-Former -> projector, 2 + 1 windows x 4 queries) equal the
    official ``prepare_inputs_labels_for_audio_and_vision`` output at the real positions."""
    ref = reference
    with torch.no_grad():
        spliced = converted.prepare_inputs(ref["audio_input_ids"], ref["audio_attention_mask"],
                                           audio=ref["audio_waveform"], audio_lengths=ref["audio_audio_lengths"])
    mask = ref["audio_spliced_attention_mask"]
    S = spliced.inputs_embeds.shape[1]
    got = spliced.inputs_embeds[mask[:, :S]]
    want = ref["audio_spliced_embeds"][:, :S][mask[:, :S]]
    assert (got - want).abs().max().item() < 1e-5
    assert int(spliced.modality.eq(3).sum()) == (2 + 1) * 4  # audio modality id 3: three windows of 4 queries


def test_official_audio_semantics_are_needed(converted, reference):
    """The zoo defaults (whole clip as one sequence, padded frames masked out of the Q-Former) give other logits on
    the official checkpoint: the converter's settings are what make the audio batch match."""
    ref = reference
    cfg = converted.config
    try:
        cfg.audio_beats_mask_padding = True  # keep the official windows, mask the padding
        masked = _max_diff(_forward(converted, ref, "audio"), ref, "audio")
        cfg.audio_beats_mask_padding, cfg.audio_beats_window = False, None  # whole clips
        with torch.no_grad():
            whole = converted.prepare_inputs(ref["audio_input_ids"], ref["audio_attention_mask"],
                                             audio=ref["audio_waveform"], audio_lengths=ref["audio_audio_lengths"])
    finally:
        cfg.audio_beats_mask_padding, cfg.audio_beats_window = False, WINDOW
    assert masked > 1e-3
    assert int(whole.modality.eq(3).sum()) == 2 * 4  # one query set per clip instead of per window


def test_config_mapping():
    """What the converter reads off the official folder: MoE in the even layers only, the BEATs and Q-Former shapes
    (12 heads: the official Blip2Config default), the official audio windows, towers used."""
    parts = read_uni_moe(CKPT, vision_tower=CLIP, audio_tower=BEATS)
    cfg = parts.config
    assert tuple(cfg.decoder.moe_layers) == (0, 2) and cfg.decoder.moe.num_experts == 4 and cfg.decoder.moe.top_k == 2
    for i in (0, 2):
        assert tuple(parts.state[f"decoder.blocks.{i}.mlp.router.proj.weight"].shape) == (4, 32)
    for i in (1, 3):  # dense SwiGLU: [gate | up] fused
        assert tuple(parts.state[f"decoder.blocks.{i}.mlp.fc1.weight"].shape) == (2 * 48, 32)
    assert cfg.audio_encoder is None and cfg.audio_qformer is None
    assert cfg.audio_beats.encoder_embed_dim == 24 and cfg.audio_beats.embed_dim == 8
    b = cfg.audio_blip2
    assert (b.dim, b.depth, b.num_heads, b.mlp_dim, b.encoder_dim, b.num_queries, b.cross_attention_every) == \
        (24, 2, 12, 48, 24, 4, 2)
    assert b.norm_eps == 1e-12
    assert cfg.audio_beats_window == WINDOW_SAMPLES == 480000 and cfg.audio_beats_mask_padding is False
    assert cfg.audio_projector == "linear" and cfg.projector == "mlp2x_gelu"
    assert parts.vision_folder == CLIP and parts.audio_folder == BEATS


def test_layout_is_detected():
    assert is_audio_variant(CKPT)
    assert not is_audio_variant(FIXTURE.parent / "uni_moe_official" / "checkpoint")  # v1 speech
    assert not is_audio_variant(FIXTURE)  # no config.json


def test_towers_found_next_to_checkpoint():
    """Without flags: the config's ``mm_audio_tower`` base name (``beats_tiny.pt``) and ``mm_vision_tower`` are
    looked up next to the checkpoint / in its parent (the fixture root)."""
    parts = read_uni_moe(CKPT)
    assert parts.audio_folder == BEATS and parts.vision_folder == CLIP


def _copy(tmp_path) -> Path:
    ck = tmp_path / "ckpt"
    shutil.copytree(CKPT, ck)
    return ck


def test_missing_audio_tower_is_a_clear_error(tmp_path):
    ck = _copy(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"mm_audio_tower.*beats_tiny\.pt.*--audio-tower FILE"):
        read_uni_moe(ck, vision_tower=CLIP)


@pytest.mark.parametrize("what", ["clip_folder", "whisper_like_pt", "missing_file", "not_torch"])
def test_wrong_audio_tower_is_a_clear_error(tmp_path, what):
    if what == "clip_folder":
        tower, err = CLIP, FileNotFoundError
        match = r"clip-vit-tiny-random is a folder with 0 \.pt files.*--audio-tower"
    elif what == "whisper_like_pt":
        tower = tmp_path / "whisper.pt"
        torch.save({"encoder.conv1.weight": torch.zeros(2, 2, 3)}, tower)
        err, match = HFCheckpointError, r"whisper\.pt is not an official BEATs checkpoint.*not Whisper"
    elif what == "missing_file":
        tower, err, match = tmp_path / "nope.pt", FileNotFoundError, r"nope\.pt does not exist.*--audio-tower FILE"
    else:
        tower = tmp_path / "junk.pt"
        tower.write_bytes(b"not a torch file")
        err, match = HFCheckpointError, r"junk\.pt is not a readable BEATs checkpoint"
    with pytest.raises(err, match=match):
        read_uni_moe(CKPT, vision_tower=CLIP, audio_tower=tower)


def test_beats_of_another_width_is_refused(tmp_path):
    """A real BEATs file whose width does not fit the aligner (e.g. another release) names both."""
    ck = torch.load(BEATS, weights_only=True)
    other = tmp_path / "beats_other.pt"
    beats_fixture = FIXTURE.parent / "beats_official"
    state = load_file(str(beats_fixture / "beats_tiny.safetensors"))
    cfg = json.loads((beats_fixture / "config.json").read_text())
    torch.save({"cfg": cfg["official_config"], "model": state}, other)
    assert ck["cfg"]["encoder_embed_dim"] == 24
    with pytest.raises(HFCheckpointError, match=r"width 24 but the BEATs in .*beats_other\.pt has width 64"):
        read_uni_moe(CKPT, vision_tower=CLIP, audio_tower=other)


def _rewrite_without_aligner(ck: Path) -> None:
    """The folder's weights without model.mm_audio_aligner.* (as a LoRA-era folder whose aligner lives only in
    mm_audio_aligner.bin)."""
    index = json.loads((ck / "pytorch_model.bin.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        sd = torch.load(ck / shard, weights_only=True)
        torch.save({k: v for k, v in sd.items() if not k.startswith("model.mm_audio_aligner.")}, ck / shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.mm_audio_aligner.")}
    (ck / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_aligner_file_fills_in_the_weights(tmp_path):
    """Weights without the aligner + ``mm_audio_aligner.bin``: converts to the same state."""
    ck = _copy(tmp_path)
    _rewrite_without_aligner(ck)
    parts = read_uni_moe(ck, vision_tower=CLIP, audio_tower=BEATS)
    full = read_uni_moe(CKPT, vision_tower=CLIP, audio_tower=BEATS)
    assert parts.state.keys() == full.state.keys()
    assert all(torch.equal(parts.state[k], full.state[k]) for k in full.state)


def test_missing_aligner_file_is_a_clear_error(tmp_path):
    ck = _copy(tmp_path)
    _rewrite_without_aligner(ck)
    (ck / "mm_audio_aligner.bin").unlink()
    with pytest.raises(HFCheckpointError, match=r"audio aligner .* missing .*mm_audio_aligner\.bin"):
        read_uni_moe(ck, vision_tower=CLIP, audio_tower=BEATS)


def test_disagreeing_adapter_file_is_refused(tmp_path):
    ck = _copy(tmp_path)
    gates = torch.load(ck / "mlp_gates.bin", weights_only=True)
    gates = {k: v + 1 for k, v in gates.items()}
    torch.save(gates, ck / "mlp_gates.bin")
    with pytest.raises(HFCheckpointError, match=r"mlp_gates\.bin and the main weights disagree"):
        read_uni_moe(ck, vision_tower=CLIP, audio_tower=BEATS)


def test_built_on_meta_in_the_requested_dtype():
    model = build_uni_moe(read_uni_moe(CKPT, vision_tower=CLIP, audio_tower=BEATS), dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" for p in params.values())
    assert params["audio_connector.qformer.query_tokens"].dtype == torch.bfloat16
