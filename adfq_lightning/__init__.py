"""adfq-lightning: ADFQ-ViT post-training quantization of timm Vision Transformers, as a Lightning plugin."""

__version__ = "0.1.0"

from .api import ADFQConfig, load_quantized, prepare, quantize, save_quantized, set_quantization
from .callback import ADFQCallback
from .modules import UnsupportedModuleError, register
from .reconstruction.module import ADFQModule

__all__ = [
    "ADFQCallback",
    "ADFQConfig",
    "ADFQModule",
    "UnsupportedModuleError",
    "load_quantized",
    "prepare",
    "quantize",
    "register",
    "save_quantized",
    "set_quantization",
]
