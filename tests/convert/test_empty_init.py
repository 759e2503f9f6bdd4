"""zoo/convert/empty_init.py: models built on the meta device for conversion get every non-persistent buffer back
exactly as a normal build has it, refuse modules that cannot re-create theirs, and are filled without copies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zoo.convert.empty_init import init_empty, load_empty
from zoo.models.decoder import DecoderConfig, DecoderLM
from zoo.moe import LoRAExperts, MoEConfig


def _all_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{m}.{n}" if m else n: b for m, mod in model.named_modules() for n, b in mod._buffers.items()
            if b is not None}


@pytest.mark.parametrize("factory", [
    lambda: DecoderLM(DecoderConfig(vocab_size=64, dim=32, depth=2, num_heads=4, mlp_dim=48, rotary_fraction=0.5,
                                    rope_base=500.0)),
    lambda: DecoderLM(DecoderConfig(vocab_size=64, dim=32, depth=2, num_heads=4, mlp_dim=48, moe_placement="all",
                                    moe=MoEConfig(num_experts=4, top_k=2))),
    lambda: LoRAExperts(4, 16, 24, "swiglu", r=3),
    lambda: LoRAExperts(4, 16, 24, "gelu", r=2),
], ids=["decoder", "moe-decoder", "lora-swiglu", "lora-gelu"])
def test_meta_build_recreates_every_buffer_exactly(factory):
    normal, empty = factory(), init_empty(factory)
    assert all(p.is_meta for p in empty.parameters())
    want, got = _all_buffers(normal), _all_buffers(empty)
    assert set(want) == set(got)
    non_persistent = {f"{m}.{n}" if m else n for m, mod in normal.named_modules()
                      for n in mod._non_persistent_buffers_set}
    assert non_persistent, "the case must hold a non-persistent buffer"
    for name in non_persistent:
        assert got[name].device.type == "cpu" and torch.equal(got[name], want[name]), name
    filled = load_empty(empty, normal.state_dict())
    for name, p in normal.state_dict().items():
        assert torch.equal(filled.state_dict()[name], p), name
    assert filled.state_dict().keys() == normal.state_dict().keys()


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("scale", torch.arange(3.0), persistent=False)


def test_buffer_without_reset_is_refused_and_unfilled_parameter_named():
    with pytest.raises(TypeError, match=r"_Scaled .*\['scale'\].*reset_buffers"):
        init_empty(_Scaled)
    empty = init_empty(lambda: nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)))
    state = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).state_dict()
    del state["1.bias"]
    with pytest.raises(RuntimeError, match="1.bias"):  # strict load
        load_empty(empty, state)


def test_load_empty_assigns_without_copying():
    empty = init_empty(lambda: nn.Linear(4, 2))
    weight, bias = torch.randn(2, 4, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.bfloat16)
    model = load_empty(empty, {"weight": weight, "bias": bias})
    assert model.weight.data_ptr() == weight.data_ptr() and model.weight.dtype == torch.bfloat16
    assert model.weight.requires_grad and not model.training
