"""``python -m zoo.convert uni-moe --checkpoint E2 --base BASE --mlp-dir EXPERTS``: official Uni-MoE 8-expert ("v2",
``Uni_MoE_8e``) fine-tunes -> zoo ``uni_moe`` models, logits equal to the OFFICIAL model's.

The fixture (``tests/fixtures/uni_moe_8e_official``, its README has every detail) was made by RUNNING the official
8-expert code (HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs at f5e82dd, DeepSpeed 0.14.0, transformers 4.31.0,
peft 0.6.2) on CPU in fp32: an 8-rank gloo expert-parallel "training" save (train.py's own save functions) of a
fine-tune on the v1 fixture's speech base (``tests/fixtures/uni_moe_official/checkpoint``, the ``--base`` here), then
the official inference loader (``load_all_pretrained_model_dp``) in one process and the official forward on the v1
fixture's image / speech / text batches, with DeepSpeed's second-expert Gumbel sampling switched off (the zoo
default; the official default samples it at random in eval).

Measured max abs logit difference at the real positions: ~4.7e-7 (image), ~5.5e-7 (speech), ~4.0e-7 (text); the
tolerance is 1e-4. With the official Gumbel sampling on, the official logits move by ~0.4-0.5 (in the fixture).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from zoo.convert.hf_files import HFCheckpointError
from zoo.convert.uni_moe import audio_chunks_from_official, read_uni_moe
from zoo.convert.uni_moe_8e import OFFICIAL_EXPERT_BASES

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "uni_moe_8e_official"
E2 = FIXTURE / "checkpoint"
EXPERTS = FIXTURE / "experts"
V1 = Path(__file__).resolve().parents[1] / "fixtures" / "uni_moe_official"
BASE = V1 / "checkpoint"
CLIP = V1 / "openai" / "clip-vit-tiny-random"
WHISPER = V1 / "openai" / "whisper-tiny-random"
BATCHES = ("image", "speech", "text")
LAYERS, E, SCALING = 2, 8, 8 / 4  # lora_alpha / lora_r of the fixture's config.json


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module")
def converted(convert_cli):
    """The fixture converted through the command line and loaded back with ``zoo.create_model("local-dir:...")``."""
    import zoo

    out = convert_cli("uni_moe_8e", "uni-moe", "--checkpoint", str(E2), "--base", str(BASE), "--mlp-dir",
                      str(EXPERTS), "--vision-tower", str(CLIP), "--audio-tower", str(WHISPER))
    return out, zoo.create_model(f"local-dir:{out}").eval()


def _kwargs(ref, batch):
    if batch == "image":
        return {"images": ref["image_images"]}
    if batch == "speech":
        return {"audio": ref["speech_input_features"],
                "audio_chunks": audio_chunks_from_official(ref["speech_features_mask"])}
    return {}


def _read(**kw):
    return read_uni_moe(kw.pop("checkpoint", E2), CLIP, WHISPER, base=kw.pop("base", BASE),
                        mlp_dir=kw.pop("mlp_dir", EXPERTS), **kw)


@pytest.mark.parametrize("batch", BATCHES)
def test_logits_match_official(converted, reference, batch):
    """Logits at every real position of the official spliced sequence equal the official run's (max abs diff <=
    1e-4; measured ~5e-7), with the same real positions and labels; the loss equals the official formula's (LM
    cross-entropy, the 8-expert aux losses are off in its config) on the official logits."""
    _, model = converted
    ref = reference
    with torch.no_grad():
        out = model(input_ids=ref[f"{batch}_input_ids"], attention_mask=ref[f"{batch}_attention_mask"],
                    labels=ref[f"{batch}_labels"], **_kwargs(ref, batch))
    want, mask = ref[f"{batch}_logits"], ref[f"{batch}_spliced_attention_mask"].bool()
    S = out.logits.shape[1]
    assert S <= want.shape[1] and out.logits.shape[::2] == want.shape[::2]
    assert torch.equal(out.attention_mask.bool(), mask[:, :S]), "real positions differ from the official layout"
    assert not mask[:, S:].any(), "the official sequence has real tokens past the zoo's"
    labels = ref[f"{batch}_spliced_labels"]
    assert torch.equal(out.labels[out.attention_mask.bool()], labels[:, :S][mask[:, :S]])
    diff = (out.logits - want[:, :S]).abs()[mask[:, :S]].max().item()
    assert diff <= 1e-4, f"{batch}: max abs logit difference {diff:.3g} from the official model"
    official_loss = F.cross_entropy(want[:, :-1].reshape(-1, want.shape[-1]), labels[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(official_loss.item(), abs=1e-5)


def test_media_tokens_match_official_embeddings(converted, reference):
    """The spliced inputs equal the official ``inputs_embeds``: the fine-tune's projector (non_lora_trainables.bin)
    and audio aligner (mm_audio_aligner.bin), both different from the base's, are the ones used."""
    _, model = converted
    for batch in ("image", "speech"):
        with torch.no_grad():
            spliced = model.prepare_inputs(reference[f"{batch}_input_ids"], reference[f"{batch}_attention_mask"],
                                           **_kwargs(reference, batch))
        S = spliced.inputs_embeds.shape[1]
        mask = reference[f"{batch}_spliced_attention_mask"][:, :S].bool()
        diff = (spliced.inputs_embeds - reference[f"{batch}_spliced_embeds"][:, :S]).abs()[mask].max().item()
        assert diff <= 1e-5, f"{batch}: spliced embeddings differ from the official by {diff:.3g}"


def test_official_gumbel_sampling_is_not_the_default(converted, reference):
    """The official gate samples the second expert (Gumbel noise, also in eval): its logits in the fixture are far
    from the deterministic ones the zoo reproduces; the zoo's ``deepspeed_top2_gating: gumbel`` override gives the
    same kind of random model (a draw differs from argmax, two seeds differ from each other)."""
    import zoo

    out_dir, model = converted
    ref = reference
    mask = ref["text_spliced_attention_mask"].bool()
    assert (ref["text_logits_gumbel_seed0"] - ref["text_logits"]).abs()[mask].max() > 0.05
    assert model.config.decoder.moe.deepspeed_top2_gating == "off" and model.config.decoder.moe.dropless
    noisy = zoo.create_model(f"local-dir:{out_dir}", **{"decoder.moe.deepspeed_top2_gating": "gumbel"}).eval()
    draws = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            draws.append(noisy(input_ids=ref["text_input_ids"], attention_mask=ref["text_attention_mask"]).logits)
    with torch.no_grad():
        plain = model(input_ids=ref["text_input_ids"], attention_mask=ref["text_attention_mask"]).logits
    assert not torch.allclose(draws[0], plain, atol=1e-3) and not torch.allclose(draws[0], draws[1], atol=1e-3)


def _expected_expert(e, layer, base_name=None):
    """The official expert weights [gate | up]^T, down^T, computed here from the files with the table of the
    official code: base file + (alpha / r) B A."""
    base = torch.load(EXPERTS / f"{base_name or OFFICIAL_EXPERT_BASES[e]}.bin", weights_only=True)
    lora = torch.load(E2 / f"{e}_mlp_experts.bin", weights_only=True)
    pre = f"model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.0."
    w = {p: base[f"model.layers.{layer}.mlp.{p}.weight"] + SCALING * lora[f"{pre}{p}_lora_B.weight"] @
         lora[f"{pre}{p}_lora_A.weight"] for p in ("gate_proj", "up_proj", "down_proj")}
    return torch.cat([w["gate_proj"], w["up_proj"]]).T, w["down_proj"].T


def test_expert_mapping_is_the_official_table():
    """Expert e = the base file the official table names for it + e's own LoRA; experts 2 / 6 share mlp_base and
    5 / 7 share mlp_base7 (same base, different LoRA, so different experts)."""
    assert OFFICIAL_EXPERT_BASES == ("mlp_audiocap", "mlp_basev", "mlp_base", "mlp_base1", "mlp_base4", "mlp_base7",
                                     "mlp_base", "mlp_base7")
    state = _read().state
    for layer in range(LAYERS):
        w1, w2 = state[f"decoder.blocks.{layer}.mlp.experts.w1"], state[f"decoder.blocks.{layer}.mlp.experts.w2"]
        assert w1.shape == (E, 32, 96) and w2.shape == (E, 48, 32)
        for e in range(E):
            want1, want2 = _expected_expert(e, layer)
            torch.testing.assert_close(w1[e], want1, atol=1e-6, rtol=0)
            torch.testing.assert_close(w2[e], want2, atol=1e-6, rtol=0)
        for a, b in ((2, 6), (5, 7)):
            assert not torch.allclose(w1[a], w1[b])
        gates = torch.load(E2 / "mlp_gates.bin", weights_only=True)
        assert torch.equal(state[f"decoder.blocks.{layer}.mlp.router.proj.weight"],
                           gates[f"model.layers.{layer}.mlp.deepspeed_moe.gate.wg.weight"])


def test_expert_bases_flag_changes_the_mapping():
    """``--expert-bases`` is the mapping: swapping experts 0 and 1's files swaps their bases (not their LoRA)."""
    table = list(OFFICIAL_EXPERT_BASES)
    table[0], table[1] = table[1], table[0]
    state = _read(expert_bases=",".join(table)).state
    w1 = state["decoder.blocks.1.mlp.experts.w1"]
    torch.testing.assert_close(w1[0], _expected_expert(0, 1, base_name="mlp_basev")[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(w1[1], _expected_expert(1, 1, base_name="mlp_audiocap")[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(w1[2], _expected_expert(2, 1)[0], atol=1e-6, rtol=0)


def _copy_e2(tmp_path) -> Path:
    dst = tmp_path / "e2"
    shutil.copytree(E2, dst)
    return dst


def test_base_copy_inside_expert_file_is_ignored(tmp_path):
    """``{e}_mlp_experts.bin`` also holds the expert's base weights; the official loader lets the --mlp-dir file win,
    and so does the converter (a changed copy changes nothing)."""
    e2 = _copy_e2(tmp_path)
    sd = torch.load(e2 / "3_mlp_experts.bin", weights_only=True)
    for k in sd:
        if k.endswith("_proj.weight"):
            sd[k] = sd[k] + 1.0
    torch.save(sd, e2 / "3_mlp_experts.bin")
    assert torch.equal(_read(checkpoint=e2).state["decoder.blocks.0.mlp.experts.w1"],
                       _read().state["decoder.blocks.0.mlp.experts.w1"])


def test_missing_expert_file_is_a_clear_error(tmp_path):
    e2 = _copy_e2(tmp_path)
    (e2 / "5_mlp_experts.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"5_mlp_experts\.bin is missing"):
        _read(checkpoint=e2)


def test_missing_base_file_is_a_clear_error(tmp_path):
    experts = tmp_path / "experts"
    shutil.copytree(EXPERTS, experts)
    (experts / "mlp_base7.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"mlp_base7\.bin is missing: it is the base FFN of expert\(s\) "
                                                r"\[5, 7\].*--expert-bases"):
        _read(mlp_dir=experts)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"mlp_dir": None}, HFCheckpointError, "pass --mlp-dir"),
    ({"base": None}, HFCheckpointError, "pass --base"),
    ({"expert_bases": "mlp_base,mlp_base"}, HFCheckpointError, "num_experts=8: pass --expert-bases"),
    ({"expert_bases": "mlp_base,,mlp_base"}, HFCheckpointError, "comma-separated"),
    ({"mlp_dir": Path("/no/such/experts")}, FileNotFoundError, "--mlp-dir"),
])
def test_bad_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        _read(**kwargs)


def test_mlp_dir_for_a_v1_folder_is_refused():
    with pytest.raises(HFCheckpointError, match="no {e}_mlp_experts.bin"):
        read_uni_moe(BASE, CLIP, WHISPER, mlp_dir=EXPERTS)


@pytest.mark.parametrize("change,match", [
    ({"use_fm_block": True}, "use_fm_block"),
    ({"num_experts_per_tok": 1}, "top-2 only"),
    ({"lora_r": 0}, "lora_r > 0"),
    ({"num_hidden_layers": 1}, "layer 1"),
])
def test_unsupported_configs_are_refused(tmp_path, change, match):
    e2 = _copy_e2(tmp_path)
    cfg = json.loads((e2 / "config.json").read_text())
    (e2 / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(HFCheckpointError, match=match):
        _read(checkpoint=e2)


def test_bad_expert_files_are_clear_errors(tmp_path):
    e2 = _copy_e2(tmp_path)
    (e2 / "mlp_gates.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"mlp_gates\.bin is missing"):
        _read(checkpoint=e2)
    e2 = _copy_e2(tmp_path / "b")
    sd = torch.load(e2 / "2_mlp_experts.bin", weights_only=True)
    sd.update({k.replace("deepspeed_experts.0.", "deepspeed_experts.1."): v for k, v in sd.items()})
    torch.save(sd, e2 / "2_mlp_experts.bin")
    with pytest.raises(HFCheckpointError, match="several rank-local slots"):
        _read(checkpoint=e2)
    e2 = _copy_e2(tmp_path / "c")
    sd = torch.load(e2 / "4_mlp_experts.bin", weights_only=True)
    del sd["model.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts.0.up_proj_lora_B.weight"]
    torch.save(sd, e2 / "4_mlp_experts.bin")
    with pytest.raises(HFCheckpointError, match=r"4_mlp_experts\.bin lacks the LoRA factor\(s\) \['up_proj_lora_B'\] "
                                                "of layer 1"):
        _read(checkpoint=e2)
