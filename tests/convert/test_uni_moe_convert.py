"""``python -m zoo.convert uni-moe``: official Uni-MoE v1 (speech) checkpoints -> zoo ``uni_moe`` models, logits equal
to the OFFICIAL model's.

The fixture (``tests/fixtures/uni_moe_official``, its README has every detail) was made by running the official
``Uni_MoE_speech`` code (HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs at f5e82dd, transformers 4.31.0) on CPU in
fp32: a tiny random LLaMA with 4 experts / top-2 in every layer, a tiny CLIP tower + ``mlp2x_gelu`` projector, a tiny
Whisper (8 mel bins, 16 frames) + Whisper-decoder aligner with 4 query tokens, and the logits it computed on an
image batch, a speech batch (clips of 2 and 1 windows) and a text batch.

The official forward keeps pad ids inside the sequence (masked) and right-pads rows to the longest; the zoo drops
pad ids before splicing. Real tokens sit at the same positions in both, so the comparison is at the positions the
official spliced attention mask marks real; the zoo's sequence may be shorter (speech: 13 vs 16 columns) and the
official columns past it are all padding (checked). Measured max abs logit difference: ~6e-8 (text), ~9e-8 (image),
~1.2e-7 (speech), far below the 1e-4 target.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo.convert.hf_files import HFCheckpointError
from zoo.convert.uni_moe import audio_chunks_from_official, convert_uni_moe, read_uni_moe

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "uni_moe_official"
CKPT = FIXTURE / "checkpoint"
CLIP = FIXTURE / "openai" / "clip-vit-tiny-random"
WHISPER = FIXTURE / "openai" / "whisper-tiny-random"
BATCHES = ("image", "speech", "text")


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module")
def converted(convert_cli):
    """The fixture converted through the command line (towers passed explicitly) and loaded back with
    ``zoo.create_model("local-dir:...")``."""
    import zoo

    out = convert_cli("uni_moe", "uni-moe", "--checkpoint", str(CKPT), "--vision-tower", str(CLIP),
                      "--audio-tower", str(WHISPER))
    assert json.loads((out / "config.json").read_text())["family"] == "uni_moe"
    return zoo.create_model(f"local-dir:{out}").eval()


def _forward(model, ref, batch):
    kwargs = {}
    if batch == "image":  # the zoo gives images[b] to sample b; sample 1 has no placeholder, so its image is unused
        kwargs["images"] = ref["image_images"]
    if batch == "speech":
        kwargs["audio"] = ref["speech_input_features"]
        kwargs["audio_chunks"] = audio_chunks_from_official(ref["speech_features_mask"])
    with torch.no_grad():
        return model(input_ids=ref[f"{batch}_input_ids"], attention_mask=ref[f"{batch}_attention_mask"],
                     labels=ref[f"{batch}_labels"], **kwargs)


@pytest.mark.parametrize("batch", BATCHES)
def test_logits_match_official(converted, reference, batch):
    """Logits at every real position of the official spliced sequence equal the official ones (max abs diff <=
    1e-4; measured ~1e-7), with the same real positions, labels there, and loss."""
    ref = reference
    out = _forward(converted, ref, batch)
    want, mask = ref[f"{batch}_logits"], ref[f"{batch}_spliced_attention_mask"]
    S = out.logits.shape[1]
    assert S <= want.shape[1] and out.logits.shape[::2] == want.shape[::2]
    assert torch.equal(out.attention_mask.bool(), mask[:, :S]), "real positions differ from the official layout"
    assert not mask[:, S:].any(), "the official sequence has real tokens past the zoo's"
    assert torch.equal(out.labels[out.attention_mask.bool()], ref[f"{batch}_spliced_labels"][:, :S][mask[:, :S]])
    diff = (out.logits - want[:, :S]).abs()[mask[:, :S]].max().item()
    assert diff <= 1e-4, f"{batch}: max abs logit difference {diff:.3g} from the official model"
    meta = json.loads((FIXTURE / "reference_meta.json").read_text())
    assert out.loss.item() == pytest.approx(meta[batch]["loss"], abs=1e-5)


def test_media_tokens_match_official_embeddings(converted, reference):
    """The spliced inputs (CLIP -> projector; Whisper encoder -> decoder Q-Former -> projector) equal the official
    ``inputs_embeds`` at the real positions: localises a failure of the logits test to the media paths or the LM."""
    for batch in ("image", "speech"):
        ref = reference
        kwargs = ({"images": ref["image_images"]} if batch == "image" else
                  {"audio": ref["speech_input_features"],
                   "audio_chunks": audio_chunks_from_official(ref["speech_features_mask"])})
        with torch.no_grad():
            spliced = converted.prepare_inputs(ref[f"{batch}_input_ids"], ref[f"{batch}_attention_mask"], **kwargs)
        S = spliced.inputs_embeds.shape[1]
        mask = ref[f"{batch}_spliced_attention_mask"][:, :S]
        diff = (spliced.inputs_embeds - ref[f"{batch}_spliced_embeds"][:, :S]).abs()[mask].max().item()
        assert diff <= 1e-5, f"{batch}: spliced embeddings differ from the official by {diff:.3g}"


def test_config_mapping():
    """What the converter reads: Mixtral routing in every layer, the tiny towers' shapes, the aligner."""
    parts = read_uni_moe(CKPT, vision_tower=CLIP, audio_tower=WHISPER)
    cfg = parts.config
    dec, moe = cfg.decoder, cfg.decoder.moe
    assert dec.moe_layer_indices == (0, 1) and dec.num_kv_heads in (None, 4) and dec.norm_eps == 1e-5
    assert (moe.num_experts, moe.top_k, moe.renormalize, moe.dropless, moe.noise_std) == (4, 2, True, True, 0.0)
    assert moe.switch_loss_weight == 0.0 and moe.num_modalities == 4 and moe.activation == "swiglu"
    assert cfg.projector == "mlp2x_gelu" and cfg.audio_projector == "mlp2x_gelu"
    assert cfg.vision.feature_layer == -2 and cfg.vision.select == "patch"
    assert (cfg.audio_encoder.n_mels, cfg.audio_encoder.max_positions, cfg.audio_encoder.dim) == (8, 8, 16)
    assert (cfg.audio_qformer.num_queries, cfg.audio_qformer.max_positions) == (4, 16)
    state = parts.state
    assert state["decoder.blocks.0.mlp.experts.w1"].shape == (4, 32, 2 * 48)
    assert state["decoder.blocks.0.mlp.experts.w2"].shape == (4, 48, 32)
    assert state["audio_connector.query_tokens"].shape == (1, 4, 16)


def test_towers_found_next_to_checkpoint(tmp_path):
    """Without tower arguments, the config's ``openai/clip-vit-tiny-random`` / ``openai/whisper-tiny-random``
    resolve offline to folders of those names beside the checkpoint; the written folder loads."""
    import zoo

    parts = read_uni_moe(CKPT)
    assert parts.vision_folder == FIXTURE / "openai/clip-vit-tiny-random"
    assert parts.audio_folder == FIXTURE / "openai/whisper-tiny-random"
    convert_uni_moe(CKPT, tmp_path / "out", dtype=torch.bfloat16)
    model = zoo.create_model(f"local-dir:{tmp_path / 'out'}")
    assert model.audio_connector.num_queries == 4


def test_missing_tower_is_a_clear_error(tmp_path):
    shutil.copytree(CKPT, tmp_path / "checkpoint")
    with pytest.raises(FileNotFoundError, match="--vision-tower"):
        read_uni_moe(tmp_path / "checkpoint", audio_tower=WHISPER)
    with pytest.raises(FileNotFoundError, match="--audio-tower"):
        read_uni_moe(tmp_path / "checkpoint", vision_tower=CLIP)
    with pytest.raises(FileNotFoundError, match="--audio-tower"):
        read_uni_moe(tmp_path / "checkpoint", vision_tower=CLIP, audio_tower=tmp_path / "no-such-whisper")


def test_wrong_tower_is_a_clear_error():
    with pytest.raises(HFCheckpointError, match="must be one of"):
        read_uni_moe(CKPT, vision_tower=WHISPER, audio_tower=WHISPER)
    with pytest.raises(HFCheckpointError, match="must be one of"):
        read_uni_moe(CKPT, vision_tower=CLIP, audio_tower=CLIP)


@pytest.mark.parametrize("model_type", ["llama", "moe_llava_stablelm", "llava_llama"])
def test_other_model_type_is_refused(tmp_path, model_type):
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(CKPT, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
    with pytest.raises(HFCheckpointError, match=f"not an official Uni-MoE checkpoint: model_type '{model_type}'"):
        read_uni_moe(ckpt, vision_tower=CLIP, audio_tower=WHISPER)


@pytest.mark.parametrize("key,value,match", [("audio_projector_type", "mlp3x_gelu", "audio_projector type"),
                                             ("mm_projector_type", "identity", "mm_projector type"),
                                             ("mm_audio_select_layer", -2, "mm_audio_select_layer")])
def test_unsupported_settings_are_refused(tmp_path, key, value, match):
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(CKPT, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(HFCheckpointError, match=match):
        read_uni_moe(ckpt, vision_tower=CLIP, audio_tower=WHISPER)


def test_audio_chunks_from_official():
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1]])
    assert audio_chunks_from_official(mask).tolist() == [[True, True, False], [True, False, False],
                                                         [False, False, False]]
    with pytest.raises(ValueError, match="one audio clip per sample"):
        audio_chunks_from_official(torch.tensor([[1, 2, 0]]))


def test_qformer_comes_from_the_aligner_not_the_whisper_folder(monkeypatch):
    """In the fixture the aligner's decoder still equals the Whisper folder's decoder (the official code initialises
    it from the tower and the fixture was not trained), so the parity test cannot tell the two apart; a released
    checkpoint's aligner is trained. Perturb the aligner's decoder and check the converted Q-Former follows it."""
    import zoo.convert.uni_moe as conv

    real = conv.read_uni_moe_layout

    def perturbed(*args, **kwargs):
        layout = real(*args, **kwargs)
        layout.audio_aligner = {k: v + 1.0 if k.startswith("decoder.") else v for k, v in layout.audio_aligner.items()}
        return layout

    monkeypatch.setattr(conv, "read_uni_moe_layout", perturbed)
    parts = conv.read_uni_moe(CKPT, vision_tower=CLIP, audio_tower=WHISPER)
    tower = load_file(str(WHISPER / "model.safetensors")) if (WHISPER / "model.safetensors").is_file() else \
        torch.load(WHISPER / "pytorch_model.bin", weights_only=True)
    for zoo_name, hf_name in (("norm.weight", "decoder.layer_norm.weight"),
                              ("blocks.0.mlp.fc1.weight", "decoder.layers.0.fc1.weight"),
                              ("pos_embed", "decoder.embed_positions.weight")):
        assert torch.equal(parts.state[f"audio_connector.qformer.{zoo_name}"], tower[hf_name] + 1.0), zoo_name


def test_built_on_meta_in_the_requested_dtype():
    """build_uni_moe builds on the meta device and assigns the converted tensors: the requested dtype holds for every
    floating-point parameter (no float32 model first), values equal the float32 build cast, and every buffer (RoPE's
    inv_freq re-created, the Whisper positions loaded) equals a normally built model's."""
    from zoo.convert.uni_moe import build_uni_moe
    from zoo.models.uni_moe import UniMoE

    parts = read_uni_moe(CKPT, CLIP, WHISPER)
    fp32, bf16 = build_uni_moe(parts), build_uni_moe(parts, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    want = fp32.state_dict()
    for name, value in bf16.state_dict().items():
        assert torch.equal(value, want[name].to(value.dtype)), name
    normal = UniMoE(parts.config)
    normal_buffers = dict(normal.named_buffers())
    for name, buf in fp32.named_buffers():
        if name in normal.state_dict():  # persistent: the checkpoint's value
            assert torch.equal(buf, want[name]), name
        else:
            assert torch.equal(buf, normal_buffers[name]), name
