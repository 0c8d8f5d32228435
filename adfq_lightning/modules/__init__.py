"""Quantized modules for timm ViT/DeiT/Swin and the float -> quantized registry."""

from .attention import QuantAttention
from .linear import QuantConv2d, QuantLinear, calibrate_weights
from .matmul import QuantMatMul
from .mlp import QuantMlp
from .scores import AttentionScores, recording_scores
from .registry import QUANTIZED_MODULES, UnsupportedModuleError, convert, is_quantized, register
from .window_attention import QuantWindowAttention

__all__ = [
    "AttentionScores",
    "QUANTIZED_MODULES",
    "QuantAttention",
    "QuantConv2d",
    "QuantLinear",
    "QuantMatMul",
    "QuantMlp",
    "QuantWindowAttention",
    "UnsupportedModuleError",
    "calibrate_weights",
    "convert",
    "is_quantized",
    "recording_scores",
    "register",
]
