"""Fake-quantizers: pure PyTorch modules, no Lightning inside."""

from .adaround import AdaRoundQuantizer
from .base import GRAD_MODES, activation_quantizers, GradMode, Quantizer, calibrating, check_bits, outermost_quantizers, round_ste, \
    set_quantization
from .best_of import BestOfQuantizer
from .log2 import LogQuantizer, LogSqrt2Quantizer, ShiftLog2Quantizer, log_levels
from .per_patch import PerPatchOutlierQuantizer
from .uniform import UniformQuantizer

__all__ = [
    "GRAD_MODES",
    "GradMode",
    "AdaRoundQuantizer",
    "BestOfQuantizer",
    "LogQuantizer",
    "LogSqrt2Quantizer",
    "PerPatchOutlierQuantizer",
    "Quantizer",
    "ShiftLog2Quantizer",
    "UniformQuantizer",
    "activation_quantizers",
    "calibrating",
    "check_bits",
    "log_levels",
    "outermost_quantizers",
    "round_ste",
    "set_quantization",
]
