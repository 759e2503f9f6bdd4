"""``python -m zoo.convert uni-moe --checkpoint FINETUNE --base BASE``: official Uni-MoE v1 ``-e2`` LoRA fine-tunes.

No official ``-e2`` fixture exists, so the fine-tune folders are SYNTHETIC, built here on top of the committed
speech-base fixture (``tests/fixtures/uni_moe_official``) with the file and key names the official training script
and PEFT write (learnt from HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs ``Uni_MoE/Uni_MoE_speech``: the trainer
saves the PEFT adapter with ``save_pretrained``, the other trainable tensors to ``non_lora_trainables.bin``, the
routers to ``mlp_gates.bin``; its LoRA loader strips ``base_model.`` then a doubled ``model.``, merges with PEFT's
``merge_and_unload`` and loads aligner + gates last):

- ``adapter_config.json`` (``peft_type`` LORA, r 4, lora_alpha 8 -> scaling 2, ``target_modules`` = the full module
  names, as the official ``find_all_llm_linear_names`` gives them) + ``adapter_model.bin`` with random A ``[r, in]``
  and B ``[out, r]`` at ``base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight`` and
  ``base_model.model.model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.lora_{A,B}.weight``;
- ``non_lora_trainables.bin``: a new ``base_model.model.model.mm_projector.0.weight`` and a new
  ``base_model.model.model.layers.1.input_layernorm.weight``;
- ``mlp_gates.bin``: new routers ``model.layers.{i}.mlp.gate.weight``; ``mm_audio_aligner.bin`` copied from the base.

The reference is built WITHOUT the converter's merge: the zoo model of the base with the same overrides, its expert
FFNs replaced by per-expert ``nn.Linear`` layers, and ``zoo.layers.lora.apply_lora`` LoRALinear wrappers carrying the
same A / B on every targeted linear (unmerged: the delta is computed in the forward). Measured: merged vs unmerged
max abs logit difference ~1.2e-6 image / 5e-7 speech / 9e-7 text (tolerance 1e-5), while the fine-tune moves
the logits by ~0.5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from zoo.convert.hf_files import HFCheckpointError
from zoo.convert.uni_moe import UniMoEParts, audio_chunks_from_official, build_uni_moe, read_uni_moe
from zoo.layers.lora import LoRALinear, apply_lora
from zoo.moe.experts import Experts

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "uni_moe_official"
CKPT = FIXTURE / "checkpoint"
CLIP = FIXTURE / "openai" / "clip-vit-tiny-random"
WHISPER = FIXTURE / "openai" / "whisper-tiny-random"
R, ALPHA, LAYERS, EXPERTS, H, FF = 4, 8, 2, 4, 32, 48
SHAPES = {"q_proj": (H, H), "k_proj": (H, H), "v_proj": (H, H), "o_proj": (H, H),
          "gate_proj": (FF, H), "up_proj": (FF, H), "down_proj": (H, FF)}


def _targets() -> list[str]:
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    names += [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(LAYERS) for e in range(EXPERTS)
              for p in ("gate_proj", "up_proj", "down_proj")]
    return names


def _make_finetune(folder: Path, seed: int = 0) -> dict:
    """A synthetic -e2 folder in ``folder``; returns what was put in it (official module names)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(CKPT / "config.json", folder / "config.json")
    shutil.copy(CKPT / "mm_audio_aligner.bin", folder / "mm_audio_aligner.bin")
    lora = {}
    for name in _targets():
        out_f, in_f = SHAPES[name.rsplit(".", 1)[1]]
        lora[name] = (torch.randn(R, in_f, generator=g) * 0.3, torch.randn(out_f, R, generator=g) * 0.3)
    adapter = {}
    for name, (a, b) in lora.items():
        adapter[f"base_model.model.{name}.lora_A.weight"] = a
        adapter[f"base_model.model.{name}.lora_B.weight"] = b
    torch.save(adapter, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.05,
        "bias": "none", "fan_in_fan_out": False, "target_modules": _targets(), "base_model_name_or_path": str(CKPT),
        "inference_mode": True}))
    non_lora = {"model.mm_projector.0.weight": torch.randn(H, 16, generator=g) * 0.2,
                "model.layers.1.input_layernorm.weight": 1 + 0.3 * torch.randn(H, generator=g)}
    torch.save({f"base_model.model.{k}": v for k, v in non_lora.items()}, folder / "non_lora_trainables.bin")
    gates = {f"model.layers.{i}.mlp.gate.weight": torch.randn(EXPERTS, H, generator=g) * 0.5 for i in range(LAYERS)}
    torch.save(gates, folder / "mlp_gates.bin")
    return {"lora": lora, "non_lora": non_lora, "gates": gates}


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unimoe_e2") / "Uni-MoE-speech-e2"
    return folder, _make_finetune(folder)


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE / "reference.safetensors"))


class _LinearExperts(Experts):
    """Test-only experts: one SwiGLU FFN of three ``nn.Linear`` per expert (official names), so ``apply_lora`` can
    wrap them; the zoo's StackedExperts weights split back (``w1 = [gate | up]^T``, ``w2 = down^T``)."""

    def __init__(self, w1, w2) -> None:
        super().__init__()
        E, D, H2 = w1.shape
        self.num_experts, self.dim, self.hidden_dim, self.activation = E, D, H2 // 2, "swiglu"
        self.experts = nn.ModuleList()
        for e in range(E):
            m = nn.Module()
            m.gate_proj, m.up_proj = nn.Linear(D, H2 // 2, bias=False), nn.Linear(D, H2 // 2, bias=False)
            m.down_proj = nn.Linear(H2 // 2, D, bias=False)
            with torch.no_grad():
                m.gate_proj.weight.copy_(w1[e, :, :H2 // 2].t())
                m.up_proj.weight.copy_(w1[e, :, H2 // 2:].t())
                m.down_proj.weight.copy_(w2[e].t())
            self.experts.append(m)

    def expert(self, e, x):
        m = self.experts[e]
        return m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))

    def stacked(self):
        return None


def _unmerged_reference(made: dict):
    """The base fixture as a zoo model + the fine-tune's overrides (zoo names), LoRA applied UNMERGED."""
    parts = read_uni_moe(CKPT, vision_tower=CLIP, audio_tower=WHISPER)
    state = dict(parts.state)
    state["projector.0.weight"] = made["non_lora"]["model.mm_projector.0.weight"]
    state["decoder.blocks.1.attn_norm.weight"] = made["non_lora"]["model.layers.1.input_layernorm.weight"]
    for i in range(LAYERS):
        state[f"decoder.blocks.{i}.mlp.router.proj.weight"] = made["gates"][f"model.layers.{i}.mlp.gate.weight"]
    model = build_uni_moe(UniMoEParts(parts.config, state, parts.vision_folder, parts.audio_folder, []))
    for i in range(LAYERS):
        mlp = model.decoder.blocks[i].mlp
        mlp.experts = _LinearExperts(mlp.experts.w1.detach(), mlp.experts.w2.detach())

    def zoo_name(official: str) -> str:
        _, _, i, rest = official.split(".", 3)
        if rest.startswith("self_attn."):
            return f"decoder.blocks.{i}.attn.{rest[len('self_attn.'):]}"
        return f"decoder.blocks.{i}.mlp.experts.experts.{rest[len('mlp.experts.'):]}"

    names = {zoo_name(n): ab for n, ab in made["lora"].items()}
    apply_lora(model, list(names), r=R, alpha=ALPHA)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for n, (a, b) in names.items():
            assert isinstance(modules[n], LoRALinear)
            modules[n].lora_A.copy_(a)
            modules[n].lora_B.copy_(b)
    return model.eval()


def _logits(model, ref, batch):
    kwargs = {}
    if batch == "image":
        kwargs["images"] = ref["image_images"]
    if batch == "speech":
        kwargs["audio"] = ref["speech_input_features"]
        kwargs["audio_chunks"] = audio_chunks_from_official(ref["speech_features_mask"])
    with torch.no_grad():
        out = model(input_ids=ref[f"{batch}_input_ids"], attention_mask=ref[f"{batch}_attention_mask"], **kwargs)
    return out.logits, out.attention_mask.bool()


def test_merged_equals_unmerged_lora(finetune, reference, tmp_path):
    """CLI conversion with --base (merged LoRA, plain experts) == the unmerged LoRALinear reference (<= 1e-5) on
    the image, speech and text batches; the LoRA and overrides change the logits by much more than that."""
    import zoo
    from zoo.convert.__main__ import main

    folder, made = finetune
    out = tmp_path / "converted"
    assert main(["uni-moe", "--checkpoint", str(folder), "--base", str(CKPT), "--out", str(out),
                 "--vision-tower", str(CLIP), "--audio-tower", str(WHISPER)]) == 0
    merged = zoo.create_model(f"local-dir:{out}").eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    unmerged = _unmerged_reference(made)
    base = build_uni_moe(read_uni_moe(CKPT, vision_tower=CLIP, audio_tower=WHISPER)).eval()
    for batch in ("image", "speech", "text"):
        got, mask = _logits(merged, reference, batch)
        want, want_mask = _logits(unmerged, reference, batch)
        assert torch.equal(mask, want_mask)
        diff = (got - want).abs()[mask].max().item()
        assert diff <= 1e-5, f"{batch}: merged vs unmerged LoRA max abs logit difference {diff:.3g}"
        moved = (got - _logits(base, reference, batch)[0]).abs()[mask].max().item()
        assert moved > 0.1, f"{batch}: the fine-tune barely changes the logits ({moved:.3g}); the test is too weak"


def test_overrides_and_gates_replace_base(finetune):
    """non_lora_trainables.bin and mlp_gates.bin tensors land as they are (after the base_model.model. prefix is
    stripped); tensors nobody touched stay the base's; merged weights are base + (alpha / r) B A."""
    folder, made = finetune
    parts = read_uni_moe(folder, vision_tower=CLIP, audio_tower=WHISPER, base=CKPT)
    base = read_uni_moe(CKPT, vision_tower=CLIP, audio_tower=WHISPER).state
    s = parts.state
    assert torch.equal(s["projector.0.weight"], made["non_lora"]["model.mm_projector.0.weight"])
    assert torch.equal(s["decoder.blocks.1.attn_norm.weight"],
                       made["non_lora"]["model.layers.1.input_layernorm.weight"])
    assert torch.equal(s["decoder.blocks.0.attn_norm.weight"], base["decoder.blocks.0.attn_norm.weight"])
    assert torch.equal(s["projector.2.weight"], base["projector.2.weight"])
    for i in range(LAYERS):
        assert torch.equal(s[f"decoder.blocks.{i}.mlp.router.proj.weight"],
                           made["gates"][f"model.layers.{i}.mlp.gate.weight"])
    a, b = made["lora"]["model.layers.0.self_attn.v_proj"]
    torch.testing.assert_close(s["decoder.blocks.0.attn.v_proj.weight"],
                               base["decoder.blocks.0.attn.v_proj.weight"] + (ALPHA / R) * b @ a)
    a, b = made["lora"]["model.layers.1.mlp.experts.2.down_proj"]
    torch.testing.assert_close(s["decoder.blocks.1.mlp.experts.w2"][2],
                               base["decoder.blocks.1.mlp.experts.w2"][2] + ((ALPHA / R) * b @ a).t())
    assert any("LoRA" in n for n in parts.notes)


def _copy(finetune, tmp_path) -> Path:
    folder = tmp_path / "ft"
    shutil.copytree(finetune[0], folder)
    return folder


def test_missing_base_is_a_clear_error(finetune):
    with pytest.raises(HFCheckpointError, match=r"--base"):
        read_uni_moe(finetune[0], vision_tower=CLIP, audio_tower=WHISPER)
    with pytest.raises(HFCheckpointError, match=r"--base was given but .* not a LoRA fine-tune"):
        read_uni_moe(CKPT, vision_tower=CLIP, audio_tower=WHISPER, base=CKPT)


def test_shape_mismatches_name_file_and_key(finetune, tmp_path):
    folder = _copy(finetune, tmp_path)
    sd = torch.load(folder / "non_lora_trainables.bin")
    sd["base_model.model.model.mm_projector.0.weight"] = torch.zeros(H, 17)
    torch.save(sd, folder / "non_lora_trainables.bin")
    with pytest.raises(HFCheckpointError, match=r"non_lora_trainables\.bin: key 'model\.mm_projector\.0\.weight' "
                                                r"is \(32, 17\)"):
        read_uni_moe(folder, vision_tower=CLIP, audio_tower=WHISPER, base=CKPT)

    folder = _copy(finetune, tmp_path / "b")
    sd = torch.load(folder / "adapter_model.bin")
    sd["base_model.model.model.layers.0.mlp.experts.1.up_proj.lora_B.weight"] = torch.zeros(FF + 1, R)
    torch.save(sd, folder / "adapter_model.bin")
    with pytest.raises(HFCheckpointError, match=r"adapter_model\.bin: .*model\.layers\.0\.mlp\.experts\.1\.up_proj"
                                                r"\.weight.* is \(49, 32\)"):
        read_uni_moe(folder, vision_tower=CLIP, audio_tower=WHISPER, base=CKPT)

    folder = _copy(finetune, tmp_path / "c")
    sd = torch.load(folder / "adapter_model.bin")
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(R + 1, H)
    torch.save(sd, folder / "adapter_model.bin")
    with pytest.raises(HFCheckpointError, match=r"adapter_model\.bin: 'base_model\.model\.model\.layers\.0\.self_attn"
                                                r"\.q_proj\.lora_A\.weight' is \(5, 32\).*r=4"):
        read_uni_moe(folder, vision_tower=CLIP, audio_tower=WHISPER, base=CKPT)

    folder = _copy(finetune, tmp_path / "d")
    torch.save({"model.layers.0.mlp.router.weight": torch.zeros(EXPERTS, H)}, folder / "mlp_gates.bin")
    with pytest.raises(HFCheckpointError, match=r"mlp_gates\.bin: key 'model\.layers\.0\.mlp\.router\.weight' names "
                                                r"no tensor of the base"):
        read_uni_moe(folder, vision_tower=CLIP, audio_tower=WHISPER, base=CKPT)


def test_unknown_lora_target_names_file_and_key(finetune, tmp_path):
    folder = _copy(finetune, tmp_path)
    sd = torch.load(folder / "adapter_model.bin")
    sd["base_model.model.model.mm_projector.0.lora_A.weight"] = torch.zeros(R, 16)
    sd["base_model.model.model.mm_projector.0.lora_B.weight"] = torch.zeros(H, R)
    torch.save(sd, folder / "adapter_model.bin")
    with pytest.raises(HFCheckpointError, match=r"adapter_model\.bin: key 'base_model\.model\.model\.mm_projector\.0"
                                                r"\.lora_A\.weight': unknown LoRA target 'model\.mm_projector\.0'"):
        read_uni_moe(folder, vision_tower=CLIP, audio_tower=WHISPER, base=CKPT)

    folder = _copy(finetune, tmp_path / "b")
    sd = torch.load(folder / "adapter_model.bin")
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_embedding_A"] = torch.zeros(R, H)
    torch.save(sd, folder / "adapter_model.bin")
    with pytest.raises(HFCheckpointError, match=r"adapter_model\.bin: key .*lora_embedding_A' is not a LoRA factor"):
        read_uni_moe(folder, vision_tower=CLIP, audio_tower=WHISPER, base=CKPT)

    folder = _copy(finetune, tmp_path / "c")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFCheckpointError, match=r"adapter_model\.bin: key .*k_proj.* not in adapter_config\.json "
                                                r"target_modules"):
        read_uni_moe(folder, vision_tower=CLIP, audio_tower=WHISPER, base=CKPT)


def test_peft_variants(tmp_path):
    """Adapter-name segment (``lora_A.default.weight``), use_rslora (alpha / sqrt r), rank/alpha patterns, and
    fan_in_fan_out (no effect on nn.Linear targets, as in PEFT); DoRA refused."""
    from zoo.convert.uni_moe_lora import lora_deltas

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, H, generator=g), torch.randn(FF, 2, generator=g)
    key = "base_model.model.model.layers.0.mlp.experts.0.gate_proj"
    sd = {f"{key}.lora_A.default.weight": a, f"{key}.lora_B.default.weight": b}
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    base_cfg = {"r": 8, "lora_alpha": 16, "rank_pattern": {"gate_proj": 2}, "target_modules": ["gate_proj"]}
    torch.testing.assert_close(lora_deltas(sd, base_cfg, "x")[name], 8.0 * b @ a)
    torch.testing.assert_close(lora_deltas(sd, {**base_cfg, "alpha_pattern": {"experts.0.gate_proj": 4}}, "x")[name],
                               2.0 * b @ a)
    torch.testing.assert_close(lora_deltas(sd, {**base_cfg, "use_rslora": True}, "x")[name], 16 / 2 ** 0.5 * b @ a)
    torch.testing.assert_close(lora_deltas(sd, {**base_cfg, "fan_in_fan_out": True}, "x")[name], 8.0 * b @ a)
    with pytest.raises(HFCheckpointError, match="DoRA"):
        lora_deltas(sd, {**base_cfg, "use_dora": True}, "x")
