"""adfq-lightning: ADFQ-ViT post-training quantization of timm Vision Transformers, as a Lightning plugin."""

from .api import ADFQConfig, load_quantized, prepare, quantize, save_quantized, set_quantization
from .modules import UnsupportedModuleError, register

__version__ = "0.1.0"

__all__ = [
    "ADFQConfig",
    "UnsupportedModuleError",
    "load_quantized",
    "prepare",
    "quantize",
    "register",
    "save_quantized",
    "set_quantization",
]
