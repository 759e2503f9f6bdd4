"""Projectors from vision-tower features to the language model's width (LLaVA's ``mm_projector``)."""

from __future__ import annotations

from torch import nn

PROJECTOR_KINDS = ("linear", "mlp2x_gelu")


class Projector(nn.Sequential):
    """features ``[..., in_dim]`` -> ``[..., out_dim]``.

    - ``"mlp2x_gelu"``: ``Linear(in_dim, out_dim)``, exact (erf) GELU, ``Linear(out_dim, out_dim)``; parameters
      ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``, the layout of the official projector (an
      ``nn.Sequential``; MoE-LLaVA stores it as ``model.mm_projector.image_spatial_proj.{0,2}.*``, LLaVA as
      ``model.mm_projector.{0,2}.*``), so it loads after stripping that prefix.
    - ``"linear"``: one ``Linear(in_dim, out_dim)``, parameters ``0.weight``, ``0.bias`` (the official linear
      projector is a bare ``nn.Linear`` with ``weight``/``bias``: a converter adds the ``0.``).
    """

    def __init__(self, kind: str, in_dim: int, out_dim: int) -> None:
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"unknown projector kind {kind!r}; known kinds: {', '.join(PROJECTOR_KINDS)}")
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if kind == "linear":
            super().__init__(nn.Linear(in_dim, out_dim))
        else:
            super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.kind, self.in_dim, self.out_dim = kind, in_dim, out_dim
