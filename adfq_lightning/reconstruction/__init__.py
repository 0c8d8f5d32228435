"""Attention-score enhanced Module-wise Optimization (ASMO): cache, losses, engine, Lightning module."""

from .engine import Reconstructor, Stage, set_quantization
from .units import build_units, check_supported

__all__ = ["Reconstructor", "Stage", "build_units", "check_supported", "set_quantization"]
