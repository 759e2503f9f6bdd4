"""Typed configs and the preset registry: unknown names/keys and wrong types fail with a ConfigError that
says what is wrong and suggests close matches."""

from __future__ import annotations

import pytest

import zoo
from zoo.config import ConfigError, from_dict, merge, to_dict
from zoo.models import VMoEConfig
from zoo.moe import MoEConfig


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("name,suggestion", [("vmoe_tiny_tst", "vmoe_tiny_test"), ("vmoe_s23", "vmoe_s32"),
                                             ("vmoe_b16_", "vmoe_b16"), ("vmoe-s32", "vmoe_s32")])
def test_unknown_preset_names_close_matches(name, suggestion):
    with pytest.raises(ConfigError, match=rf"unknown model '{name}'.*did you mean.*'{suggestion}'"):
        zoo.create_model(name)
    with pytest.raises(ConfigError, match="list_models"):
        zoo.model_config(name)


def test_unknown_preset_without_close_match_still_explains():
    with pytest.raises(ConfigError, match=r"unknown model 'zzzz'.*list_models") as err:
        zoo.create_model("zzzz")
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize("overrides,bad,suggestion", [
    ({"num_classs": 10}, "num_classs", "num_classes"),
    ({"imagesize": 32}, "imagesize", "image_size"),
    ({"encoder": {"dept": 2}}, "dept", "depth"),
    ({"encoder": {"moe": {"num_expert": 4}}}, "num_expert", "num_experts"),
    ({"encoder.moe.topk": 1}, "topk", "top_k"),
    ({"encoder.moe_evry": 2}, "moe_evry", "moe_every"),
])
def test_unknown_override_keys_name_close_matches(overrides, bad, suggestion):
    with pytest.raises(ConfigError, match=rf"unknown key '{bad}' in .* did you mean .*'{suggestion}'.*Valid keys:"):
        zoo.model_config("vmoe_tiny_test", **overrides)
    with pytest.raises(ConfigError, match=rf"unknown key '{bad}'"):
        zoo.create_model("vmoe_tiny_test", **overrides)


def test_nested_error_says_where():
    with pytest.raises(ConfigError, match=r"encoder\.moe"):
        zoo.model_config("vmoe_tiny_test", **{"encoder.moe.num_expert": 4})


def test_dotted_and_nested_overrides_apply_and_keep_the_rest():
    cfg = zoo.model_config("vmoe_tiny_test", **{"encoder.moe.top_k": 1, "encoder.depth": 2}, num_classes=3)
    assert (cfg.encoder.moe.top_k, cfg.encoder.depth, cfg.num_classes) == (1, 2, 3)
    assert cfg.encoder.moe.num_experts == 4 and cfg.encoder.dim == 32  # untouched preset values survive
    cfg = zoo.model_config("vmoe_tiny_test", encoder={"moe": {"num_experts": 2, "top_k": 1}})
    assert (cfg.encoder.moe.num_experts, cfg.encoder.moe.top_k, cfg.encoder.moe.group_size) == (2, 1, 2)
    model = zoo.create_model("vmoe_tiny_test", **{"encoder.moe.num_experts": 2, "encoder.moe.top_k": 1})
    assert model.encoder.blocks[1].mlp.experts.num_experts == 2


@pytest.mark.parametrize("overrides,match", [
    ({"image_size": "32"}, r"image_size must be int"),
    ({"num_classes": 10.0}, r"num_classes must be int"),
    ({"encoder.moe.num_experts": 2.5}, r"num_experts must be int"),
    ({"encoder.moe.top_k": True}, r"top_k must be an int"),
    ({"encoder.moe.noise_std": "1.0"}, r"noise_std must be a number"),
    ({"encoder.moe.capacity_factor": True}, r"capacity_factor must be a number"),
    ({"encoder.moe.capacity_factor": [1.0]}, r"capacity_factor must be a number"),
    ({"encoder.moe.renormalize": "yes"}, r"renormalize must be bool"),
    ({"classifier": "cls"}, r"classifier must be one of \['token', 'gap'\]"),
    ({"encoder.moe.router": "top_k"}, r"router must be one of"),
    ({"encoder.moe.activation": "relu"}, r"activation must be one of"),
    ({"encoder.moe_layers": "1,3"}, r"moe_layers must be a list"),
    ({"encoder.moe_layers": [1, "3"]}, r"moe_layers\[1\] must be int"),
    ({"encoder": 5}, r"encoder must be a mapping"),
])
def test_wrong_types_raise_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        zoo.model_config("vmoe_tiny_test", **overrides)


@pytest.mark.parametrize("overrides,match", [
    ({"encoder.moe.top_k": 0}, r"top_k must be in \[1, num_experts=4\]"),
    ({"encoder.moe.top_k": 5}, r"top_k must be in"),
    ({"image_size": 18}, r"divisible by patch_size"),
    ({"encoder.num_heads": 3}, r"divisible by num_heads"),
    ({"encoder.moe.capacity_factor": 0}, r"capacity_factor must be > 0"),
    ({"encoder.moe_every": 2, "encoder.moe_last": 1}, r"at most one"),
])
def test_invalid_values_raise_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        zoo.model_config("vmoe_tiny_test", **overrides)


def test_numbers_are_converted_and_round_trip():
    cfg = zoo.model_config("vmoe_tiny_test", **{"encoder.moe.capacity_factor": 2, "encoder.moe_layers": [3, 1],
                                                 "encoder.moe_every": None})
    assert cfg.encoder.moe.capacity_factor == 2.0 and isinstance(cfg.encoder.moe.capacity_factor, float)
    assert cfg.encoder.moe_layers == (3, 1) and cfg.encoder.moe_layer_indices == (1, 3)
    again = from_dict(VMoEConfig, to_dict(cfg))
    assert again == cfg
    assert isinstance(again.encoder.moe, MoEConfig)


def test_merge_dotted_keys():
    base = {"a": 1, "b": {"c": 2, "d": {"e": 3}}}
    assert merge(base, {"b.d.e": 4, "b.c": 5}) == {"a": 1, "b": {"c": 5, "d": {"e": 4}}}
    assert base == {"a": 1, "b": {"c": 2, "d": {"e": 3}}}  # not mutated
    assert merge(base, {"b": {"x": 1}}) == {"a": 1, "b": {"c": 2, "d": {"e": 3}, "x": 1}}


def test_list_models_filters():
    assert "vmoe_tiny_test" in zoo.list_models()
    assert zoo.list_models("vmoe_tiny_*") == ["vmoe_tiny_digits", "vmoe_tiny_test"]
    assert zoo.list_models(family="nope") == []
    assert all(n.startswith("vmoe_") for n in zoo.list_models(family="vmoe"))
