"""Hugging Face causal-LM import (zoo/convert/hf_lm.py): a tiny random transformers model of each model_type is
saved, converted with ``python -m zoo.convert hf-lm`` and loaded with ``zoo.create_model("local-dir:...")``; its
logits and 20 greedy tokens must equal transformers'. transformers is a test-only dependency."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from zoo.convert.__main__ import main as convert_main
from zoo.convert.hf_lm import HFCheckpointError, load_hf_lm

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, eos_token_id=None, bos_token_id=None,
              pad_token_id=None)


def hf_config(model_type: str):
    T = transformers
    if model_type == "llama":
        return T.LlamaConfig(**COMMON, rms_norm_eps=1e-5, rope_theta=500.0)
    if model_type == "qwen2":
        return T.Qwen2Config(**COMMON, rope_theta=1000.0, tie_word_embeddings=True)
    if model_type == "stablelm":
        return T.StableLmConfig(**COMMON, use_qkv_bias=True, partial_rotary_factor=0.25)
    if model_type == "phi":
        return T.PhiConfig(**COMMON, partial_rotary_factor=0.5)
    if model_type == "mixtral":
        return T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    if model_type == "olmoe":
        return T.OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2)
    if model_type == "qwen2_moe":
        return T.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                shared_expert_intermediate_size=40, decoder_sparse_step=1, mlp_only_layers=[1])
    raise AssertionError(model_type)


def hf_model(model_type: str, seed: int = 0):
    """A random transformers model with weights large enough that logits (and so greedy tokens) are far apart."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(model_type), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15 if p.ndim > 1 else 0.05)
    model.generation_config.eos_token_id = None
    return model.eval()


MODEL_TYPES = ["llama", "qwen2", "stablelm", "phi", "mixtral", "olmoe",
               "qwen2_moe"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_converted_model_matches_transformers(model_type, tmp_path):
    ref = hf_model(model_type)
    ref.save_pretrained(tmp_path / "hf")
    assert convert_main(["hf-lm", "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo")]) == 0
    model = zoo.create_model(f"local-dir:{tmp_path / 'zoo'}").eval()
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        expected, got = ref(ids).logits, model(ids).logits
    assert (expected - got).abs().max() <= 1e-4
    prompt = ids[:1, :5]
    hf_tokens = ref.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert model.generate(prompt, max_new_tokens=20).tolist() == hf_tokens.tolist()


def test_sharded_checkpoint_and_missing_shard(tmp_path):
    ref = hf_model("mixtral")
    ref.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        assert (ref(ids).logits - load_hf_lm(tmp_path / "hf")(ids).logits).abs().max() <= 1e-4
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1].name):
        load_hf_lm(tmp_path / "hf")


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.fixture
def olmoe_folder(tmp_path):
    hf_model("olmoe").save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_unknown_model_type(olmoe_folder):
    _edit_config(olmoe_folder, model_type="gpt2")
    with pytest.raises(HFCheckpointError, match="model_type 'gpt2' is not supported; supported: .*llama"):
        load_hf_lm(olmoe_folder)


def test_config_weights_mismatch(olmoe_folder, tmp_path):
    shallow = tmp_path / "shallow"
    shutil.copytree(olmoe_folder, shallow)
    _edit_config(shallow, num_hidden_layers=2)  # the weights have 3 layers
    with pytest.raises(HFCheckpointError, match="have no place in the zoo model.*layers.2"):
        load_hf_lm(shallow)
    _edit_config(olmoe_folder, intermediate_size=64)  # the experts are 48 wide
    with pytest.raises(HFCheckpointError, match="config/weights mismatch.*experts.w1"):
        load_hf_lm(olmoe_folder)


def test_missing_tensor_and_top_k_above_num_experts(olmoe_folder, tmp_path):
    more = tmp_path / "more"
    shutil.copytree(olmoe_folder, more)
    _edit_config(more, num_hidden_layers=4)
    with pytest.raises(HFCheckpointError, match="lacks tensor 'model.layers.3"):
        load_hf_lm(more)
    _edit_config(olmoe_folder, num_experts_per_tok=8)
    with pytest.raises(HFCheckpointError, match=r"top_k must be in \[1, num_experts=4\], got 8"):
        load_hf_lm(olmoe_folder)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_lm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="has no model.safetensors, pytorch_model.bin"):
        load_hf_lm(tmp_path)


def test_qwen1_layout_by_hand_mapping_from_qwen2(tmp_path):
    """Qwen-1 (``model_type: qwen``) needs trust_remote_code, so its folder is written by hand from a Qwen2 model of
    the same math (multi-head, q/k/v biases, RMSNorm, SwiGLU): fused ``c_attn`` = [q | k | v], ``w2`` = gate,
    ``w1`` = up, ``intermediate_size`` counting both halves."""
    from safetensors.torch import save_file

    T = transformers
    torch.manual_seed(0)
    ref = T.Qwen2ForCausalLM(T.Qwen2Config(**{**COMMON, "num_key_value_heads": 4}, rms_norm_eps=1e-6,
                                           rope_theta=10000.0)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.15)
    sd = ref.state_dict()
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(COMMON["num_hidden_layers"]):
        hf, q = f"model.layers.{i}", f"transformer.h.{i}"
        a = f"{hf}.self_attn"
        out[f"{q}.ln_1.weight"] = sd[f"{hf}.input_layernorm.weight"]
        out[f"{q}.ln_2.weight"] = sd[f"{hf}.post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            out[f"{q}.attn.c_attn.{kind}"] = torch.cat([sd[f"{a}.{p}_proj.{kind}"] for p in "qkv"])
        out[f"{q}.attn.c_proj.weight"] = sd[f"{a}.o_proj.weight"]
        out[f"{q}.mlp.w1.weight"] = sd[f"{hf}.mlp.up_proj.weight"]
        out[f"{q}.mlp.w2.weight"] = sd[f"{hf}.mlp.gate_proj.weight"]
        out[f"{q}.mlp.c_proj.weight"] = sd[f"{hf}.mlp.down_proj.weight"]
    folder = tmp_path / "qwen1"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
        "intermediate_size": 96, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0,
        "seq_length": 128, "kv_channels": 8, "use_dynamic_ntk": False}))
    model = load_hf_lm(folder)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert (ref(ids).logits - model(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("model_type", ["mixtral", "olmoe"])
def test_in_memory_fused_expert_layout(model_type):
    """transformers 5 holds experts fused (``mlp.experts.gate_up_proj [E, 2H, D]``); its in-memory state dict converts
    too (what benchmarks/generate.py uses to give both implementations the same weights)."""
    from zoo.convert.hf_lm import convert_state_dict, decoder_config_from_hf
    from zoo.models.decoder import DecoderLM

    ref = hf_model(model_type)
    sd = ref.state_dict()
    if not any(k.endswith("experts.gate_up_proj") for k in sd):
        pytest.skip("this transformers version keeps per-expert tensors in memory")
    cfg = decoder_config_from_hf(ref.config.to_dict())
    model = DecoderLM(cfg).eval()
    model.load_state_dict(convert_state_dict(ref.config.to_dict(), sd, cfg))
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert (ref(ids).logits - model(ids).logits).abs().max() <= 1e-4


def test_pytorch_bin_checkpoint_reads_like_safetensors(olmoe_folder, tmp_path):
    """Older hub folders (MoE-LLaVA, Uni-MoE) ship ``pytorch_model.bin``; it is read with ``weights_only``."""
    from safetensors.torch import load_file

    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((olmoe_folder / "config.json").read_text())
    torch.save(load_file(str(olmoe_folder / "model.safetensors")), bin_folder / "pytorch_model.bin")
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        assert torch.equal(load_hf_lm(olmoe_folder)(ids).logits, load_hf_lm(bin_folder)(ids).logits)
    (bin_folder / "pytorch_model.bin").write_bytes(b"not a zip")
    with pytest.raises(HFCheckpointError, match="pytorch_model.bin is not a readable PyTorch state dict"):
        load_hf_lm(bin_folder)


# ------------------------------------------------------------------ memory: no float32 model (issue 18)
class _Float32Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of every float32 CPU tensor any aten op creates (factory calls, casts, cat, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes, self.largest = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu":
                n = t.untyped_storage().nbytes()
                self.bytes, self.largest = self.bytes + n, max(self.largest, n)
        return out


@pytest.fixture
def bf16_pair(tmp_path):
    """The same random qwen2_moe model (experts, a shared expert, a dense layer) saved in float32 and in bf16."""
    ref = hf_model("qwen2_moe")
    ref.save_pretrained(tmp_path / "fp32")
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    return tmp_path / "fp32", tmp_path / "bf16"


def test_bf16_checkpoint_converts_to_bf16_equal_to_the_fp32_path_cast(bf16_pair, tmp_path):
    from safetensors.torch import load_file

    from zoo.models.decoder import DecoderLM

    fp32_folder, bf16_folder = bf16_pair
    assert convert_main(["hf-lm", "--checkpoint", str(bf16_folder), "--out", str(tmp_path / "zoo")]) == 0
    stored = load_file(str(tmp_path / "zoo" / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    model = load_hf_lm(bf16_folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    via_fp32 = load_hf_lm(fp32_folder, dtype=torch.float32)
    assert {p.dtype for p in via_fp32.parameters()} == {torch.float32}
    ours, theirs = model.state_dict(), via_fp32.state_dict()
    assert set(ours) == set(theirs) == set(stored)
    for name in ours:  # bf16 source -> bf16 model: bit-identical to converting in fp32 and casting
        assert torch.equal(ours[name], theirs[name].to(torch.bfloat16)), name
        assert torch.equal(stored[name], ours[name]), name
    # non-persistent buffers are real values, equal to a normally built model's, and the model runs
    fresh = DecoderLM(model.config)
    for name, buf in model.named_buffers():
        assert not buf.is_meta and torch.equal(buf, dict(fresh.named_buffers())[name]), name
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        got, expected = model(ids).logits.float(), via_fp32(ids).logits
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    # --dtype asks for another precision
    assert load_hf_lm(bf16_folder, dtype=torch.float16).embed.weight.dtype == torch.float16
    assert convert_main(["hf-lm", "--checkpoint", str(bf16_folder), "--out", str(tmp_path / "zoo32"),
                         "--dtype", "float32"]) == 0
    assert load_file(str(tmp_path / "zoo32" / "model.safetensors"))["embed.weight"].dtype == torch.float32
    # the bf16 folder loads like any zoo folder
    loaded = zoo.create_model(f"local-dir:{tmp_path / 'zoo'}")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value.to(torch.bfloat16), stored[name]), name


def test_tied_embeddings_stay_tied_after_meta_build(tmp_path):
    hf_model("qwen2").to(torch.bfloat16).save_pretrained(tmp_path / "hf")  # tie_word_embeddings=True
    model = load_hf_lm(tmp_path / "hf")
    assert model.lm_head.weight is model.embed.weight and model.embed.weight.dtype == torch.bfloat16
    assert model.embed.weight.requires_grad


def test_conversion_allocates_no_float32_model(bf16_pair, tmp_path):
    """Every float32 CPU tensor created while converting a bf16 checkpoint is counted: only RoPE's inv_freq-sized
    scraps are allowed, nowhere near a float32 copy of the model."""
    from zoo.convert.hf_lm import convert_hf_lm

    _, bf16_folder = bf16_pair
    fp32_model_bytes = 4 * sum(p.numel() for p in hf_model("qwen2_moe").parameters())
    with _Float32Allocations() as counter:
        model = convert_hf_lm(bf16_folder, tmp_path / "zoo")
    assert model.embed.weight.dtype == torch.bfloat16
    assert counter.bytes < 0.01 * fp32_model_bytes, (counter.bytes, fp32_model_bytes)
    # the counter sees a float32 build (so the assertion above can fail)
    with _Float32Allocations() as counter:
        load_hf_lm(bf16_folder, dtype=torch.float32)
    assert counter.bytes >= fp32_model_bytes


_PEAK_SCRIPT = r"""
import gc, sys
import torch
from zoo.convert.hf_lm import convert_hf_lm

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

convert_hf_lm(sys.argv[1], sys.argv[2] + "_warm")  # one-time lazy imports are not the converter's memory
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM)
base = status("VmRSS:")
model = convert_hf_lm(sys.argv[1], sys.argv[2])
print(status("VmHWM:") - base, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc/self/status")
def test_conversion_peak_memory_is_about_one_bf16_copy(tmp_path):
    """A ~45 MB bf16 llama converts with a peak RSS rise below 1.5x its size; a float32 build alone is 2x (the old
    converter peaked near 6x: float32 model + checkpoint + a saved copy)."""
    cfg = transformers.LlamaConfig(vocab_size=16000, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(
        tmp_path / "hf", max_shard_size="20MB")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "hf"), str(tmp_path / "zoo")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    peak, model_bytes = map(int, done.stdout.split()[-2:])
    assert model_bytes > 40e6
    assert peak < 1.5 * model_bytes, f"peak RSS rise {peak / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model"
