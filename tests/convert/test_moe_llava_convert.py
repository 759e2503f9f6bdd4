"""``python -m zoo.convert moe-llava``: official MoE-LLaVA checkpoints -> zoo ``moe_llava`` models, logits equal to
the OFFICIAL model's.

The fixture (``tests/fixtures/moe_llava_official``, its README has every detail) was made by running the official
code, PKU-YuanGroup/MoE-LLaVA at 6cb5f66 with transformers 4.37.0 and DeepSpeed 0.9.5, on CPU in fp32: for each of
``moe_llava_stablelm`` / ``moe_llava_phi`` / ``moe_llava_qwen`` the official training class built a tiny random model
(tiny CLIP tower, ``mlp2x_gelu`` projector, 4 experts, top-2, MoE every other layer) through
``initialize_vision_modules`` and ``initialize_moe_modules`` (DeepSpeed's ``MoE``), the experts were given distinct
random weights, ``save_pretrained`` wrote the hub layout, the official ``EvalMoELLaVA*ForCausalLM.from_pretrained``
loaded it back and its forward gave the reference logits for a batch mixing a sample with an image and one without,
a batch where both samples have an image, and a text-only batch. One patch: DeepSpeed's Gumbel noise on the 2nd
expert's choice was set to zero (deterministic top-2). ``eval_capacity_factor`` 2.0 with 4 experts and top-2 drops no
token (checked while generating), so the zoo's per-sequence capacity and DeepSpeed's per-batch one agree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo.convert.hf_files import HFCheckpointError
from zoo.convert.moe_llava import (convert_moe_llava, decoder_config_from_official, moe_config_from_official,
                                   read_moe_llava)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "moe_llava_official"
TOWER = FIXTURE / "clip-vit-tiny-random"
FAMILIES = ("stablelm", "phi", "qwen")
BATCHES = ("mixed", "both", "text")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> the converted folder loaded back with ``zoo.create_model("local-dir:...")`` (one conversion each:
    StableLM through the command line, Phi and Qwen through the function)."""
    import zoo
    from zoo.convert.__main__ import main

    models = {}
    for family in FAMILIES:
        out = tmp_path_factory.mktemp(f"moe_llava_{family}")
        if family == "stablelm":
            assert main(["moe-llava", "--checkpoint", str(FIXTURE / family / "checkpoint"), "--out", str(out),
                         "--image-tower", str(TOWER)]) == 0
        else:
            convert_moe_llava(FIXTURE / family / "checkpoint", out, image_tower=TOWER)
        models[family] = zoo.create_model(f"local-dir:{out}").eval()
    return models


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_official(converted, family, batch):
    """Logits over the spliced, right-padded sequence equal the official ones (max abs diff <= 1e-4) at every real
    position, and the spliced attention mask / labels have the official layout."""
    ref = load_file(str(FIXTURE / family / "reference.safetensors"))
    images = ref.get(f"{batch}_images")
    with torch.no_grad():
        out = converted[family](input_ids=ref[f"{batch}_input_ids"], attention_mask=ref[f"{batch}_attention_mask"],
                                images=images, labels=ref[f"{batch}_labels"])
    want, mask = ref[f"{batch}_logits"], ref[f"{batch}_spliced_attention_mask"]
    assert out.logits.shape == want.shape
    assert torch.equal(out.attention_mask.bool(), mask)
    assert torch.equal(out.labels, ref[f"{batch}_spliced_labels"])
    diff = (out.logits - want).abs()[mask].max().item()
    assert diff <= 1e-4, f"{family}/{batch}: max abs logit difference {diff:.3g} from the official model"


def test_official_lm_loss(converted):
    """The LM part of the loss equals the official one (the official loss adds 0.01 * its layers' l_aux, which counts
    padded positions; the zoo's balance loss does not, so only the cross-entropy is compared)."""
    from zoo.models.multimodal import shifted_lm_loss

    for family in FAMILIES:
        ref = load_file(str(FIXTURE / family / "reference.safetensors"))
        meta = json.loads((FIXTURE / family / "reference_meta.json").read_text())
        with torch.no_grad():
            out = converted[family](input_ids=ref["mixed_input_ids"], attention_mask=ref["mixed_attention_mask"],
                                    images=ref["mixed_images"], labels=ref["mixed_labels"])
        ce = shifted_lm_loss(out.logits, out.labels).item()
        assert ce == pytest.approx(meta["mixed"]["lm_loss"], abs=1e-5)


def test_config_mapping():
    """What the converter reads from the official config.json and weights."""
    parts = read_moe_llava(FIXTURE / "stablelm" / "checkpoint", image_tower=TOWER)
    dec, moe = parts.decoder, parts.decoder.moe
    assert dec.moe_layer_indices == (0, 2) and dec.num_kv_heads == 2 and dec.rotary_fraction == 0.5
    assert (moe.num_experts, moe.top_k, moe.renormalize, moe.noise_std) == (4, 2, True, 0.0)
    assert (moe.capacity_factor, moe.eval_capacity_factor, moe.capacity_multiple_of) == (1.5, 2.0, 1)
    assert moe.switch_loss_weight == 0.01 and moe.activation == "swiglu" and not moe.expert_bias
    assert parts.projector == "mlp2x_gelu" and parts.tower.feature_layer == -2 and parts.tower.select == "patch"
    assert parts.lm["blocks.0.mlp.experts.w1"].shape == (4, 32, 2 * 48)
    phi = read_moe_llava(FIXTURE / "phi" / "checkpoint", image_tower=TOWER).decoder
    # the official Phi class has no LM-head bias; Phi experts are plain GELU MLPs with biases
    assert not phi.lm_head_bias and phi.parallel_residual and phi.moe.expert_bias
    assert phi.moe.activation == "gelu_tanh" and phi.moe_layer_indices == (0,)


def test_tower_found_next_to_checkpoint(tmp_path):
    """Without --image-tower the config's ``mm_image_tower`` ("openai/clip-vit-tiny-random") resolves offline to a
    folder of that name beside the checkpoint."""
    shutil.copytree(FIXTURE / "phi" / "checkpoint", tmp_path / "checkpoint")
    shutil.copytree(TOWER, tmp_path / "clip-vit-tiny-random")
    parts = read_moe_llava(tmp_path / "checkpoint")
    assert parts.tower_folder == tmp_path / "clip-vit-tiny-random"


def test_missing_tower_is_a_clear_error(tmp_path):
    shutil.copytree(FIXTURE / "phi" / "checkpoint", tmp_path / "checkpoint")
    with pytest.raises(FileNotFoundError, match="--image-tower"):
        read_moe_llava(tmp_path / "checkpoint")
    with pytest.raises(FileNotFoundError, match="--image-tower"):
        read_moe_llava(tmp_path / "checkpoint", image_tower=tmp_path / "no-such-tower")


@pytest.mark.parametrize("model_type", ["stablelm", "llava_stablelm", "moe_llava_llama"])
def test_other_model_type_is_refused(tmp_path, model_type):
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(FIXTURE / "phi" / "checkpoint", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
    with pytest.raises(HFCheckpointError, match=f"model_type '{model_type}' is not an MoE-LLaVA checkpoint"):
        read_moe_llava(ckpt, image_tower=TOWER)


def test_unsupported_moe_settings_are_refused():
    official = json.loads((FIXTURE / "stablelm" / "checkpoint" / "config.json").read_text())
    with pytest.raises(HFCheckpointError, match="use_residual"):
        moe_config_from_official({**official, "moe": {**official["moe"], "use_residual": True}})
    with pytest.raises(HFCheckpointError, match="same expert count"):
        moe_config_from_official({**official, "moe": {**official["moe"], "num_experts": [4, 8]}})
    with pytest.raises(HFCheckpointError, match="moe_layers_idx"):
        decoder_config_from_official({**official, "moe": {**official["moe"], "moe_layers_idx": [0, 9]}})
    without = {**official, "moe": {**official["moe"], "moe_layers_idx": None, "moe_mode": "second_half"}}
    assert decoder_config_from_official(without).moe_layer_indices == (2, 3)


def test_built_on_meta_in_the_requested_dtype():
    """build_moe_llava builds on the meta device and assigns the converted tensors: the requested dtype holds for
    every parameter (no float32 model first), values equal the float32 build cast, buffers equal a normal build's."""
    from zoo.convert.moe_llava import build_moe_llava
    from zoo.models.moe_llava import MoELLaVA

    parts = read_moe_llava(FIXTURE / "stablelm" / "checkpoint", TOWER)
    fp32, bf16 = build_moe_llava(parts), build_moe_llava(parts, dtype=torch.bfloat16)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    want = fp32.state_dict()
    for name, value in bf16.state_dict().items():
        assert torch.equal(value, want[name].to(torch.bfloat16)), name
    normal = dict(MoELLaVA(fp32.config).named_buffers())
    for name, buf in bf16.named_buffers():
        assert torch.equal(buf, normal[name]), name
