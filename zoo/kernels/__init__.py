"""Fused GPU kernels for the MoE expert path (Triton). The plain-PyTorch ground truth they are tested against is
:func:`zoo.moe.dispatch.reference_moe` (kernels import no model code)."""
from .fused_moe import fused_moe, fused_moe_available, grouped_mm_available

__all__ = ["fused_moe", "fused_moe_available", "grouped_mm_available"]
