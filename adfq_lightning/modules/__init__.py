"""Quantized modules for timm ViT/DeiT/Swin and the float -> quantized registry."""

from .attention import QuantAttention
from .factory import LINEAR_INPUT_ROLES, Role, activation_quantizer, weight_quantizer
from .linear import QuantConv2d, QuantLinear, calibrate_weights
from .matmul import QuantMatMul
from .mlp import QuantMlp
from .attention_scores import AttentionScores, recording_scores
from .registry import QUANTIZED_MODULES, UnsupportedModuleError, convert, is_calibrated, is_converted, is_quantized, \
    register
from .window_attention import QuantWindowAttention

__all__ = [
    "LINEAR_INPUT_ROLES",
    "Role",
    "activation_quantizer",
    "weight_quantizer",
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
    "is_calibrated",
    "is_converted",
    "is_quantized",
    "recording_scores",
    "register",
]
