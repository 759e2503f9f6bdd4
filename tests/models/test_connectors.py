"""Projectors (zoo/models/connectors.py) against hand-written formulas and the official parameter names."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.models.connectors import PROJECTOR_KINDS, Projector


def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def test_mlp2x_gelu_is_linear_exact_gelu_linear():
    torch.manual_seed(0)
    proj = Projector("mlp2x_gelu", 12, 20)
    assert list(proj.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # the official mm_projector
    sd = proj.state_dict()
    assert sd["0.weight"].shape == (20, 12) and sd["2.weight"].shape == (20, 20)
    x = 3 * torch.randn(2, 7, 12)  # wide inputs: tanh-GELU would differ by up to ~1e-3
    want = exact_gelu(x @ sd["0.weight"].T + sd["0.bias"]) @ sd["2.weight"].T + sd["2.bias"]
    got = proj(x)
    assert got.shape == (2, 7, 20)
    assert (got - want).abs().max() <= 1e-5


def test_linear():
    torch.manual_seed(0)
    proj = Projector("linear", 12, 20)
    assert list(proj.state_dict()) == ["0.weight", "0.bias"]
    x = torch.randn(3, 12)
    sd = proj.state_dict()
    assert (proj(x) - (x @ sd["0.weight"].T + sd["0.bias"])).abs().max() <= 1e-6
    assert (proj.kind, proj.in_dim, proj.out_dim) == ("linear", 12, 20)


def test_official_state_dict_loads():
    """An mm_projector saved by the official code (nn.Sequential(Linear, GELU, Linear)) loads strictly."""
    official = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.GELU(), torch.nn.Linear(10, 10))
    proj = Projector("mlp2x_gelu", 6, 10)
    proj.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(4, 6)
    assert torch.equal(proj(x), official(x))


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown projector kind 'mlp3x_gelu'.*linear, mlp2x_gelu"):
        Projector("mlp3x_gelu", 4, 4)
    assert PROJECTOR_KINDS == ("linear", "mlp2x_gelu")
    with pytest.raises(ValueError, match="in_dim"):
        Projector("linear", 0, 4)
