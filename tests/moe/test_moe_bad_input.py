"""Bad inputs to the MoE layer and its config give a clear answer (issue 17 item 8): an empty batch gives an empty
output, a non-finite capacity factor and an unknown dispatch / router / activation name fail validation."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.moe import MoEConfig, MoELayer


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_empty_batch_gives_an_empty_output(shape, mode, causal):
    layer = MoELayer(8, 12, MoEConfig(num_experts=4, top_k=2, num_shared_experts=1), causal=causal)
    layer.train(mode == "train")
    x = torch.randn(*shape, 8)
    y = layer(x, torch.ones(shape, dtype=torch.bool))
    assert y.shape == x.shape and layer.aux is None


@pytest.mark.parametrize("name", ["capacity_factor", "eval_capacity_factor"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_capacity_factor_fails_validation(name, value):
    with pytest.raises(ValueError, match=f"{name} must be > 0 and finite"):
        MoEConfig(**{name: value})


@pytest.mark.parametrize("name,valid", [("dispatch", "'auto', 'loop', 'sorted', 'fused'"),
                                        ("router", "'topk', 'expert_choice', 'soft'"),
                                        ("activation", "'gelu', 'gelu_tanh', 'swiglu'")])
def test_unknown_names_list_the_valid_values(name, valid):
    with pytest.raises(ValueError) as err:
        MoEConfig(**{name: "bogus"})
    assert f"unknown {name} 'bogus'" in str(err.value) and valid in str(err.value)
