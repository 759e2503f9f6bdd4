"""Vision towers (zoo/models/towers.py, zoo/convert/hf_vision.py) against their references.

Hugging Face: tiny random ``CLIPVisionModel`` / ``SiglipVisionModel`` (and the full ``CLIPModel`` / ``SiglipModel``
folder layout, safetensors and pytorch_model.bin) are saved with ``save_pretrained`` into tmp_path and loaded by the
zoo; every ``hidden_states[i]`` and the selected features must equal transformers' to 1e-5. open_clip: tiny random
``VisionTransformer`` towers, compared on ``_embeds`` and ``forward_intermediates``. transformers is test-only.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from zoo.convert.hf_files import HFCheckpointError
from zoo.convert.hf_vision import (hf_vision_state_dict, vision_config_from_hf, vision_tower_from_hf,
                                  vision_tower_from_tensors)
from zoo.layers.activations import apply_activation
from zoo.models.towers import KNOWN_TOWERS, VisionTower, VisionTowerConfig, known_tower_config, \
    vision_tower_from_open_clip

transformers = pytest.importorskip("transformers")

TOL = 1e-5
# Tiny shapes. SigLIP's 30 px / patch 7 leaves 2 pixel rows / columns unseen, like so400m's 384 / 14.
CLIP_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                   patch_size=7, hidden_act="quick_gelu", layer_norm_eps=1e-5)
SIGLIP_VISION = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, image_size=30,
                     patch_size=7)
TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its init (LayerNorms off 1/0, biases off 0), so a swapped or dropped tensor shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_model(kind: str):
    T = transformers
    if kind == "clip_vision":
        return randomize(T.CLIPVisionModel(T.CLIPVisionConfig(**CLIP_VISION)))
    if kind == "siglip_vision":
        return randomize(T.SiglipVisionModel(T.SiglipVisionConfig(**SIGLIP_VISION)))
    if kind == "clip_full":
        cfg = T.CLIPConfig(text_config=TEXT, vision_config=CLIP_VISION, projection_dim=8)
        return randomize(T.CLIPModel(cfg))
    if kind == "siglip_full":
        return randomize(T.SiglipModel(T.SiglipConfig(text_config=TEXT, vision_config=SIGLIP_VISION)))
    raise AssertionError(kind)


KINDS = ["clip_vision", "siglip_vision", "clip_full", "siglip_full"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{kind: (folder, the transformers vision model)}. The full CLIP folder is rewritten in the legacy hub layout
    of openai/clip-vit-large-patch14-336: pytorch_model.bin holding the stored position_ids buffers."""
    out = {}
    for kind in KINDS:
        model = hf_model(kind)
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        out[kind] = (folder, model.vision_model if kind.endswith("_full") else model)
    folder = out["clip_full"][0]
    tensors = load_file(folder / "model.safetensors")
    tensors["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    tensors["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return out


def images_for(vision, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = vision.config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_states(vision, images):
    with torch.no_grad():
        return vision(pixel_values=images, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("kind", KINDS)
def test_every_hidden_state_matches_transformers(saved, kind):
    folder, vision = saved[kind]
    tower = vision_tower_from_hf(folder)
    x = images_for(vision)
    ref = reference_states(vision, x)
    with torch.no_grad():
        ours = tower.hidden_states(x)
    assert len(ours) == len(ref) == CLIP_VISION["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, i
        assert (a - b).abs().max() <= TOL, f"hidden_states[{i}] differs by {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("feature_layer", [-2, -1, 0, 1])
def test_features_are_the_selected_layer(saved, kind, feature_layer):
    """MoE-LLaVA's rule: hidden_states[feature_layer], CLS dropped for CLIP ("patch"), all patches for SigLIP."""
    folder, vision = saved[kind]
    clip = kind.startswith("clip")
    x = images_for(vision)
    ref = reference_states(vision, x)[feature_layer]
    for select, want in (("patch", ref[:, 1:] if clip else ref), ("cls_patch", ref)):
        tower = vision_tower_from_hf(folder, feature_layer=feature_layer, select=select)
        with torch.no_grad():
            got = tower(x)
        assert got.shape == want.shape == (2, tower.num_tokens, tower.out_dim)
        assert (got - want).abs().max() <= TOL


def test_token_counts(saved):
    clip = vision_tower_from_hf(saved["clip_vision"][0])
    assert (clip.num_tokens, clip.out_dim) == (16, 32)  # 4 x 4 patches, CLS dropped
    siglip = vision_tower_from_hf(saved["siglip_vision"][0])
    assert siglip.num_tokens == 16  # 30 // 7 = 4 per side, no CLS: all kept
    assert vision_tower_from_hf(saved["clip_vision"][0], select="cls_patch").num_tokens == 17


def test_drop_first_reproduces_the_official_siglip_slice(saved):
    """The official MoE-LLaVA SiglipVisionTower slices [:, 1:] under "patch" although SigLIP has no class token; the
    zoo offers that only as select="drop_first" (15 of 16 patches here, 728 of 729 for so400m-384)."""
    folder, vision = saved["siglip_vision"]
    x = images_for(vision)
    tower = vision_tower_from_hf(folder, select="drop_first")
    with torch.no_grad():
        got = tower(x)
    ref = reference_states(vision, x)[-2]
    assert got.shape == (2, 15, 32) and tower.num_tokens == 15
    assert (got - ref[:, 1:]).abs().max() <= TOL
    on_clip = vision_tower_from_hf(saved["clip_vision"][0], select="drop_first")
    assert on_clip.num_tokens == vision_tower_from_hf(saved["clip_vision"][0]).num_tokens  # = "patch" there


def test_wrong_image_size_is_refused(saved):
    tower = vision_tower_from_hf(saved["clip_vision"][0])
    with pytest.raises(ValueError, match=r"takes 28x28 images.*got 32x32.*resize"):
        tower(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="channel"):
        tower(torch.randn(1, 1, 28, 28))


def test_folder_of_another_model_type_is_refused(tmp_path):
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=16, image_size=14, patch_size=7))
    vit.save_pretrained(tmp_path)
    with pytest.raises(HFCheckpointError, match=r"model_type 'vit'.*clip_vision_model"):
        vision_tower_from_hf(tmp_path)


def _copy_folder(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_tensor_is_named(saved, tmp_path):
    folder = _copy_folder(saved["siglip_full"][0], tmp_path / "m",
                          lambda t: t.pop("vision_model.encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(HFCheckpointError, match=r"encoder\.layers\.1\.mlp\.fc2\.bias"):
        vision_tower_from_hf(folder)


def test_unknown_and_extra_tensors_are_named(saved, tmp_path):
    def add_unknown(t):
        t["vision_model.encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(2)

    with pytest.raises(HFCheckpointError, match=r"does not know.*rotary"):
        vision_tower_from_hf(_copy_folder(saved["siglip_full"][0], tmp_path / "a", add_unknown))

    def add_stranger(t):
        t["language_model.lm_head.weight"] = torch.zeros(2)

    with pytest.raises(HFCheckpointError, match=r"language_model\.lm_head\.weight.*neither"):
        vision_tower_from_hf(_copy_folder(saved["siglip_full"][0], tmp_path / "b", add_stranger))


def test_config_that_does_not_fit_the_weights(saved, tmp_path):
    src = saved["clip_vision"][0]
    dst = _copy_folder(src, tmp_path / "d", lambda t: None)
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    with pytest.raises(HFCheckpointError, match="more blocks than the config's num_hidden_layers=2"):
        vision_tower_from_hf(dst)
    (dst / "config.json").write_text(json.dumps({**cfg, "image_size": 35}))
    with pytest.raises(HFCheckpointError, match=r"position_embedding.*\(1, 17, 32\).*\(1, 26, 32\)"):
        vision_tower_from_hf(dst)


def test_tower_inside_a_multimodal_checkpoint(saved):
    """A multimodal checkpoint stores the tower under its own prefix next to other tensors (the LM, the projector)."""
    folder, vision = saved["siglip_vision"]
    inner = load_file(folder / "model.safetensors")
    prefix = "model.image_tower.image_tower.vision_model."
    tensors = {prefix + k: v.half() for k, v in inner.items()}
    tensors["model.mm_projector.0.weight"] = torch.zeros(2, 2)
    hf_config = json.loads((folder / "config.json").read_text())
    tower = vision_tower_from_tensors(hf_config, tensors, prefix, feature_layer=-1)
    x = images_for(vision)
    with torch.no_grad():
        assert tower.pos_embed.dtype == torch.float32
        assert (tower(x) - reference_states(vision, x)[-1]).abs().max() <= 1e-2  # fp16-rounded weights


def test_legacy_and_list_config_values():
    """CLIPConfig's legacy vision_config_dict wins over vision_config (as in transformers); [s, s] sizes are read."""
    hf = {"model_type": "clip", "vision_config": {**CLIP_VISION, "image_size": [28, 28]},
          "vision_config_dict": {"num_hidden_layers": 2}}
    cfg = vision_config_from_hf(hf)
    assert (cfg.depth, cfg.image_size, cfg.class_token, cfg.pre_norm, cfg.patch_bias) == (2, 28, True, True, False)
    with pytest.raises(HFCheckpointError, match="square"):
        vision_config_from_hf({"model_type": "siglip_vision_model", "image_size": [28, 42]})
    with pytest.raises(HFCheckpointError, match="hidden_act 'relu'"):
        vision_config_from_hf({"model_type": "clip_vision_model", "hidden_act": "relu"})


def test_hub_name_resolves_offline_and_dtype(saved, tmp_path):
    folder = saved["clip_vision"][0]
    tower = vision_tower_from_hf(folder.name, search_dirs=[folder.parent], dtype=torch.bfloat16)
    assert tower.pos_embed.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="never|download"):
        vision_tower_from_hf("nobody/no-such-tower", cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------- released shapes
# Vision values of the public config.json files (openai/clip-vit-large-patch14-336: its vision_config;
# google/siglip-so400m-patch14-384: its vision_config, which omits hidden_act / layer_norm_eps = the defaults).
PUBLIC_CONFIGS = {
    "openai/clip-vit-large-patch14-336": {"model_type": "clip", "projection_dim": 768, "vision_config": {
        "hidden_act": "quick_gelu", "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 16, "num_channels": 3,
        "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}},
    "google/siglip-so400m-patch14-384": {"model_type": "siglip", "vision_config": {
        "hidden_size": 1152, "image_size": 384, "intermediate_size": 4304, "model_type": "siglip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}},
}


@pytest.mark.parametrize("name", sorted(KNOWN_TOWERS))
def test_known_towers_are_their_public_configs(name):
    cfg = known_tower_config(name)
    assert vision_config_from_hf(PUBLIC_CONFIGS[name]) == cfg
    # The zoo tower has the shape of every transformers vision tensor (built on the meta device: no memory).
    vision_type = PUBLIC_CONFIGS[name]["vision_config"]["model_type"]
    hf_cls = {"clip_vision_model": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel),
              "siglip_vision_model": (transformers.SiglipVisionConfig, transformers.SiglipVisionModel)}[vision_type]
    with torch.device("meta"):
        hf = hf_cls[1](hf_cls[0](**PUBLIC_CONFIGS[name]["vision_config"]))
        tower = VisionTower(cfg)
    state, _ = hf_vision_state_dict(hf.state_dict(), cfg)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in tower.state_dict().items()}


def test_known_tower_token_counts():
    assert known_tower_config("openai/clip-vit-large-patch14-336").num_tokens == 576
    assert known_tower_config("google/siglip-so400m-patch14-384").num_tokens == 729
    assert known_tower_config("google/siglip-so400m-patch14-384", select="drop_first").num_tokens == 728
    with pytest.raises(ValueError, match="known"):
        known_tower_config("openai/clip-vit-base-patch32")


def test_config_errors():
    with pytest.raises(ValueError, match=r"feature_layer=-5.*-4 <= feature_layer <= 3"):
        VisionTowerConfig(depth=3, dim=32, num_heads=4, feature_layer=-5)
    with pytest.raises(ValueError, match="select must be one of"):
        VisionTowerConfig(select="cls")
    with pytest.raises(ValueError, match="activation"):
        VisionTowerConfig(activation="swiglu")


def test_quick_gelu_formula():
    x = torch.linspace(-6, 6, 101)
    assert torch.equal(apply_activation(x, "quick_gelu"), x * torch.sigmoid(1.702 * x))


# ------------------------------------------------------------------------------------------------- open_clip
open_clip = pytest.importorskip("open_clip")


def open_clip_visual(**kw):
    from open_clip.transformer import QuickGELU, VisionTransformer

    args = dict(image_size=28, patch_size=7, width=32, layers=3, heads=4, mlp_ratio=1.5, output_dim=8,
                act_layer=QuickGELU)
    args.update(kw)
    return randomize(VisionTransformer(**args))


def open_clip_states(visual, x):
    """open_clip's hidden states: _embeds (0) and every block's output, class token first."""
    with torch.no_grad():
        out = visual.forward_intermediates(x, indices=list(range(len(visual.transformer.resblocks))),
                                           output_fmt="NLC", output_extra_tokens=True, intermediates_only=True)
        blocks = [torch.cat([p, t], dim=1) for p, t in zip(out["image_intermediates_prefix"],
                                                           out["image_intermediates"])]
        return [visual._embeds(x)] + blocks


@pytest.mark.parametrize("variant", ["quick_gelu", "gelu_no_ln_pre"])
def test_open_clip_tower_matches(variant):
    kw = {} if variant == "quick_gelu" else dict(act_layer=torch.nn.GELU, no_ln_pre=True)
    visual = open_clip_visual(**kw)
    x = torch.randn(2, 3, 28, 28)
    ref = open_clip_states(visual, x)
    tower = vision_tower_from_open_clip(visual)
    assert tower.config.activation == ("quick_gelu" if variant == "quick_gelu" else "gelu")
    with torch.no_grad():
        ours = tower.hidden_states(x)
        feats = tower(x)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert (a - b).abs().max() <= TOL, f"hidden state {i} differs by {(a - b).abs().max():.2e}"
    assert (feats - ref[-2][:, 1:]).abs().max() <= TOL


def test_open_clip_full_model_and_refusals():
    model = open_clip.CLIP(embed_dim=8, vision_cfg=dict(image_size=28, patch_size=7, width=32, layers=2, head_width=8,
                                                        mlp_ratio=2.0),
                           text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
                           quick_gelu=True)
    randomize(model)
    x = torch.randn(1, 3, 28, 28)
    tower = vision_tower_from_open_clip(model, feature_layer=-1, select="cls_patch")
    with torch.no_grad():
        assert (tower(x) - open_clip_states(model.visual, x)[-1]).abs().max() <= TOL
    with pytest.raises(ValueError, match="LayerScale"):
        vision_tower_from_open_clip(open_clip_visual(ls_init_value=0.1))
    with pytest.raises(TypeError, match="VisionTransformer"):
        vision_tower_from_open_clip(torch.nn.Linear(2, 2))
