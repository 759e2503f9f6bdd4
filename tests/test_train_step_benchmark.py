"""benchmarks/train_step.py: its FLOP count (the target's denominator) against torch's own FLOP counter."""

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import zoo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step  # noqa: E402


def _counted(model, config) -> int:
    images = torch.randn(4, config.in_chans, config.image_size, config.image_size)
    # The math attention backend is plain matmuls, which every torch version's counter sees (some versions do
    # not count the fused CPU attention kernels).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops() // 4  # a whole number of routing groups (2 images each)


@pytest.mark.parametrize("overrides", [
    {"encoder.moe_every": None},  # dense ViT
    {"representation_size": 24, "classifier": "token"},
    # Dropless so that every token reaches its k experts (the benchmark counts nominal expert FLOPs); the
    # per-expert loop dispatcher runs plain matmuls the counter sees.
    {"encoder.moe.dropless": True, "encoder.moe.dispatch": "loop"},
    {"encoder.moe.dropless": True, "encoder.moe.dispatch": "loop", "encoder.moe.top_k": 1, "encoder.moe_every": 1},
])
def test_forward_flops_match_torch_flop_counter(overrides):
    if "encoder.moe_every" not in overrides or overrides["encoder.moe_every"] is not None:
        overrides = {**overrides, "encoder.moe.dropless": True, "encoder.moe.dispatch": "loop"}
    config = zoo.model_config("vmoe_tiny_test", **overrides)
    model = zoo.create_model("vmoe_tiny_test", **overrides).eval()
    assert train_step.forward_flops(config)["total"] == _counted(model, config)


def test_b16_flop_ratio_is_the_expected_one():
    moe = train_step.forward_flops(zoo.model_config("vmoe_b16", **train_step.MOE_OVERRIDES))
    dense = train_step.forward_flops(zoo.model_config("vmoe_b16", **train_step.DENSE_OVERRIDES))
    # 6 of 12 MLPs run twice (k=2): the MLPs are ~2/3 of ViT-B/16's FLOPs, so about 1 + 1/3.
    assert 1.30 < moe["total"] / dense["total"] < 1.36
    assert moe["experts"] == 2 * 6 * 2 * 197 * 2 * 768 * 3072
