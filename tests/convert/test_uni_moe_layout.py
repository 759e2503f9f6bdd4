"""The Uni-MoE v1 layout reader on the fixture written by the OFFICIAL Uni-MoE speech code
(tests/fixtures/uni_moe_official/README.md says how it was made), and the fixture's reference outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo.convert.hf_files import HFCheckpointError, read_weight_file
from zoo.convert.uni_moe_layout import AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX, read_uni_moe_layout

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "uni_moe_official"
CKPT = FIXTURE / "checkpoint"
VISION = FIXTURE / "openai" / "clip-vit-tiny-random"
AUDIO = FIXTURE / "openai" / "whisper-tiny-random"


@pytest.fixture(scope="module")
def layout():
    return read_uni_moe_layout(CKPT, vision_tower_dir=VISION, audio_tower_dir=AUDIO)


def test_reader_finds_every_group(layout):
    s = layout.settings
    assert (s["hidden_size"], s["num_layers"], s["num_experts"], s["top_k"]) == (32, 2, 4, 2)
    assert s["moe_layers"] == [0, 1] and s["rope_theta"] == 10000.0 and s["hidden_act"] == "silu"
    assert s["query_tokens_size"] == 4 and s["mm_projector_type"] == "mlp2x_gelu"
    assert s["audio_projector_type"] == "mlp2x_gelu" and s["mm_vision_select_layer"] == -2
    assert len(layout.lm) == 3 + 6 * 2
    assert layout.lm["embed_tokens.weight"].shape == (64, 32) and layout.lm["lm_head.weight"].shape == (64, 32)
    for i in range(2):
        assert layout.routers[i].shape == (4, 32)
        assert len(layout.experts[i]) == 4
        for ex in layout.experts[i]:
            assert ex["gate_proj.weight"].shape == (48, 32) and ex["up_proj.weight"].shape == (48, 32)
            assert ex["down_proj.weight"].shape == (32, 48)
    assert not layout.dense_mlps
    assert {k: tuple(v.shape) for k, v in layout.projector.items()} == {
        "0.weight": (32, 16), "0.bias": (32,), "2.weight": (32, 32), "2.bias": (32,)}
    al = layout.audio_aligner
    assert al["query_tokens"].shape == (1, 4, 16)
    assert al["projector.0.weight"].shape == (32, 16) and al["projector.2.weight"].shape == (32, 32)
    assert "decoder.layers.1.encoder_attn.k_proj.weight" in al and "decoder.embed_positions.weight" in al
    assert layout.vision_tower[0]["model_type"] == "clip_vision_model"
    assert layout.audio_tower[0]["model_type"] == "whisper"
    assert "encoder.layers.0.fc1.weight" in layout.audio_tower[1]
    # shadow tower copies in the checkpoint are reported, not used
    assert any(k.startswith("model.audio_tower.encoder.") for k in layout.ignored)
    assert any(k.startswith("model.vision_tower.vision_tower.") for k in layout.ignored)
    # the adapter files hold exactly the groups read from the main weights
    proj = read_weight_file(CKPT / "mm_projector.bin")
    assert torch.equal(proj["model.mm_projector.0.weight"], layout.projector["0.weight"])
    assert torch.equal(read_weight_file(CKPT / "mm_audio_aligner.bin")["model.query_tokens"], al["query_tokens"])


def test_towers_are_optional_and_config_paths_not_followed(layout):
    bare = read_uni_moe_layout(CKPT)
    assert bare.vision_tower is None and bare.audio_tower is None
    assert bare.settings["mm_audio_tower_name"] == "openai/whisper-tiny-random"


def test_refuses_another_model_type(tmp_path):
    other = Path(__file__).resolve().parents[1] / "fixtures" / "moe_llava_official" / "phi" / "checkpoint"
    with pytest.raises(HFCheckpointError, match="not an official Uni-MoE checkpoint"):
        read_uni_moe_layout(other)
    with pytest.raises(HFCheckpointError, match="whisper"):
        read_uni_moe_layout(CKPT, audio_tower_dir=VISION)


def _copy(tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(CKPT, dst)
    return dst


def test_missing_expert_shard_fails_loudly(tmp_path):
    dst = _copy(tmp_path)
    wmap = json.loads((dst / "pytorch_model.bin.index.json").read_text())["weight_map"]
    shard = wmap["model.layers.1.mlp.experts.3.down_proj.weight"]
    (dst / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard.replace(".", r"\.")):
        read_uni_moe_layout(dst)


def test_missing_expert_tensor_and_unknown_tensor_fail_loudly(tmp_path):
    dst = _copy(tmp_path)
    tensors = {}
    for f in sorted(dst.glob("pytorch_model-*.bin")):
        tensors.update(read_weight_file(f))
        f.unlink()
    (dst / "pytorch_model.bin.index.json").unlink()
    missing = dict(tensors)
    del missing["model.layers.1.mlp.experts.2.up_proj.weight"]
    torch.save(missing, dst / "pytorch_model.bin")
    with pytest.raises(HFCheckpointError, match=r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight"):
        read_uni_moe_layout(dst)
    extra = dict(tensors)
    extra["model.layers.0.mlp.experts.4.up_proj.weight"] = torch.zeros(48, 32)
    torch.save(extra, dst / "pytorch_model.bin")
    with pytest.raises(HFCheckpointError, match="does not know"):
        read_uni_moe_layout(dst)


def test_reference_outputs_are_finite_and_match_the_spliced_sequences():
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    patches, q = 16, 4  # (16 / 4) ** 2 CLIP patches (CLS dropped); 4 query tokens per audio chunk
    for b in ("image", "speech", "text"):
        logits, sam = ref[f"{b}_logits"], ref[f"{b}_spliced_attention_mask"]
        assert torch.isfinite(logits).all(), b
        assert logits.shape[:2] == sam.shape and logits.shape[2] == 64
        assert ref[f"{b}_spliced_labels"].shape == sam.shape
    # image: sample 0 has one -200 (9 ids -> 8 + 16); sample 1 none, its image masked off by image_mask
    ids, am = ref["image_input_ids"], ref["image_attention_mask"]
    assert (ids[0] == IMAGE_TOKEN_INDEX).sum() == 1 and not (ids[1] == IMAGE_TOKEN_INDEX).any()
    assert ref["image_image_mask"].tolist() == [True, False]
    assert int(ref["image_spliced_attention_mask"][0].sum()) == int(am[0].sum()) - 1 + patches
    assert int(ref["image_spliced_attention_mask"][1].sum()) == int(am[1].sum())
    assert ref["image_logits"].shape[1] == 9 - 1 + patches
    # speech: one -300 per sample; features_mask groups chunks: sample 0 = 2 chunks, sample 1 = 1 chunk
    ids, am, fm = ref["speech_input_ids"], ref["speech_attention_mask"], ref["speech_features_mask"]
    assert ((ids == AUDIO_TOKEN_INDEX).sum(1) == 1).all()
    assert fm.tolist() == [[1, 1, 0], [1, 0, 0]] and ref["speech_input_features"].shape == (2, 3, 8, 16)
    for i, chunks in enumerate((2, 1)):
        assert int(ref["speech_spliced_attention_mask"][i].sum()) == int(am[i].sum()) - 1 + chunks * q
    # padding is kept inside the spliced row (9 columns incl. pad -> 8 + 2 * 4 = 16)
    assert ref["speech_logits"].shape[1] == 9 - 1 + 2 * q
    # real positions first, then padding (right-padded)
    for b in ("image", "speech", "text"):
        sam = ref[f"{b}_spliced_attention_mask"].int()
        assert (sam[:, 1:] <= sam[:, :-1]).all()
    assert torch.equal(ref["text_spliced_attention_mask"], ref["text_attention_mask"])


def _lm_forward(layout, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A plain-torch reading of the README's numerics (RMSNorm, rotate-half RoPE base 10000, top-2 of raw router
    logits then softmax over the two, SwiGLU experts); checks the fixture's documentation, not zoo's model."""
    s, w = layout.settings, layout.lm
    B, S, H = embeds.shape
    nh = s["num_heads"]
    hd = H // nh

    def rms(x, g):
        return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s["rms_norm_eps"]))

    inv = 1.0 / (s["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(S).float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    causal = torch.ones(S, S).tril().bool()
    allowed = causal[None] & mask[:, None, :]
    h = embeds
    for i in range(s["num_layers"]):
        x = rms(h, w[f"layers.{i}.input_layernorm.weight"])
        q, k, v = (
            (x @ w[f"layers.{i}.self_attn.{n}_proj.weight"].T).view(B, S, nh, hd).transpose(1, 2) for n in "qkv")
        att = (rope(q) @ rope(k).transpose(-1, -2)) / hd ** 0.5
        att = att.masked_fill(~allowed[:, None], torch.finfo(att.dtype).min).softmax(-1)
        h = h + (att @ v).transpose(1, 2).reshape(B, S, H) @ w[f"layers.{i}.self_attn.o_proj.weight"].T
        x = rms(h, w[f"layers.{i}.post_attention_layernorm.weight"]).reshape(-1, H)
        logits = x @ layout.routers[i].T
        top, idx = logits.topk(s["top_k"], dim=-1)
        gates = top.softmax(-1)
        out = torch.zeros_like(x)
        for e, ex in enumerate(layout.experts[i]):
            y = (torch.nn.functional.silu(x @ ex["gate_proj.weight"].T) * (x @ ex["up_proj.weight"].T)) \
                @ ex["down_proj.weight"].T
            out += ((idx == e).float() * gates).sum(-1, keepdim=True) * y
        h = h + out.view(B, S, H)
    return rms(h, w["norm.weight"]) @ w["lm_head.weight"].T


def test_documented_lm_numerics_reproduce_the_official_logits(layout):
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    for b in ("image", "speech", "text"):
        mask = ref[f"{b}_spliced_attention_mask"]
        embeds = ref.get(f"{b}_spliced_embeds")
        if embeds is None:
            embeds = layout.lm["embed_tokens.weight"][ref[f"{b}_input_ids"].clamp(min=0)]
        got = _lm_forward(layout, embeds, mask)
        want = ref[f"{b}_logits"]
        assert (got - want)[mask].abs().max() < 1e-4, b


def _mlp2x_gelu(p: dict[str, Tensor], x: Tensor, prefix: str = "") -> Tensor:
    x = torch.nn.functional.linear(x, p[f"{prefix}0.weight"], p[f"{prefix}0.bias"])
    return torch.nn.functional.linear(torch.nn.functional.gelu(x), p[f"{prefix}2.weight"], p[f"{prefix}2.bias"])


def test_documented_media_paths_reproduce_the_official_spliced_embeddings(layout):
    """CLIP hidden_states[-2] patches -> mm_projector; Whisper encoder last_hidden_state -> Whisper decoder on the
    query tokens (causal, learned positions) -> aligner projector; placed where the README says."""
    transformers = pytest.importorskip("transformers")
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    emb = layout.lm["embed_tokens.weight"]
    with torch.no_grad():
        vcfg, vw = layout.vision_tower
        clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{
            k: v for k, v in vcfg.items() if k not in ("architectures", "transformers_version")})).eval()
        if hasattr(clip, "vision_model"):  # transformers 4 nests the transformer; 5 drops the prefix
            clip.load_state_dict(vw)
        else:
            clip.load_state_dict({k[len("vision_model."):]: v for k, v in vw.items()})
        hs = clip(ref["image_images"][:1], output_hidden_states=True).hidden_states[-2][:, 1:]
        img = _mlp2x_gelu(layout.projector, hs)[0]
        ids = ref["image_input_ids"][0]
        p = int((ids == IMAGE_TOKEN_INDEX).nonzero())
        want = torch.cat([emb[ids[:p]], img, emb[ids[p + 1:]]])
        assert (ref["image_spliced_embeds"][0] - want).abs().max() < 1e-5

        acfg, aw = layout.audio_tower
        whisper = transformers.WhisperModel(transformers.WhisperConfig(**{
            k: v for k, v in acfg.items() if k not in ("architectures", "transformers_version")})).eval()
        whisper.encoder.load_state_dict({k[len("encoder."):]: v for k, v in aw.items() if k.startswith("encoder.")})
        whisper.decoder.load_state_dict({k[len("decoder."):]: v for k, v in layout.audio_aligner.items()
                                         if k.startswith("decoder.")})
        q = layout.audio_aligner["query_tokens"]
        for i, chunks in enumerate((2, 1)):
            toks = []
            for c in range(chunks):
                enc = whisper.encoder(ref["speech_input_features"][i, c][None]).last_hidden_state
                dec = whisper.decoder(inputs_embeds=q, encoder_hidden_states=enc).last_hidden_state
                toks.append(_mlp2x_gelu(layout.audio_aligner, dec, "projector.")[0])
            ids = ref["speech_input_ids"][i]
            p = int((ids == AUDIO_TOKEN_INDEX).nonzero())
            want = torch.cat([emb[ids[:p]], *toks, emb[ids[p + 1:]]])
            got = ref["speech_spliced_embeds"][i, : want.shape[0]]
            assert (got - want).abs().max() < 1e-5, i
            assert not ref["speech_spliced_embeds"][i, want.shape[0]:].any()  # zero right padding
