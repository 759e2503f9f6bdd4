"""Fused GPU kernels for the MoE expert path (Triton)."""
from .fused_moe import fused_moe, fused_moe_available, grouped_mm_available
from .reference import reference_moe

__all__ = ["fused_moe", "fused_moe_available", "grouped_mm_available", "reference_moe"]
