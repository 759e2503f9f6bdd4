"""Eval-time routing has one source of truth, the model's config: ``set_eval_overrides`` writes it there (the layers
read the same objects), ``save_pretrained`` keeps it in config.json, and the loaded model routes with it."""

from __future__ import annotations

import json

import pytest
import torch

import zoo
from zoo import hub
from zoo.moe import moe_layers, set_eval_overrides


@torch.no_grad()
def test_override_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model("vmoe_tiny_test").eval()
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    before = model(x).routing[0].capacity
    set_eval_overrides(model, capacity_factor=4.0, top_k=1)
    moe = model.config.encoder.moe
    assert (moe.eval_capacity_factor, moe.eval_top_k) == (4.0, 1)
    assert all(layer.config.eval_capacity_factor == 4.0 and layer.config.eval_top_k == 1
               for layer in moe_layers(model))
    out = model(x)
    assert out.routing[0].capacity != before
    hub.save_pretrained(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m/config.json").read_text())["encoder"]["moe"]
    assert (saved["eval_capacity_factor"], saved["eval_top_k"]) == (4.0, 1)
    loaded = zoo.create_model(f"local-dir:{tmp_path / 'm'}").eval()
    assert (loaded.config.encoder.moe.eval_capacity_factor, loaded.config.encoder.moe.eval_top_k) == (4.0, 1)
    got = loaded(x)
    assert [s.capacity for s in got.routing] == [s.capacity for s in out.routing]
    torch.testing.assert_close(got.logits, out.logits, rtol=0, atol=0)


def test_invalid_override_changes_nothing():
    model = zoo.create_model("vmoe_tiny_test")
    with pytest.raises(ValueError):
        set_eval_overrides(model, capacity_factor=2.0, top_k=99)
    assert model.config.encoder.moe.eval_capacity_factor is None
    assert all(layer.config.eval_capacity_factor is None for layer in moe_layers(model))
