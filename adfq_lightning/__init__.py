"""adfq-lightning: ADFQ-ViT post-training quantization of timm Vision Transformers, as a Lightning plugin.

``import adfq_lightning`` loads the pure-PyTorch core only. ``ADFQCallback`` and ``ADFQModule`` are the
Lightning face (:mod:`adfq_lightning.lightning`); naming them here imports Lightning on first use.
"""

__version__ = "0.2.0"

from .allocation import BitBudget, allocate_bits
from .api import ADFQConfig, prepare, quantize, set_quantization
from .checkpoint import load_quantized, save_quantized
from .modules import UnsupportedModuleError, register

__all__ = [
    "ADFQCallback",
    "ADFQConfig",
    "ADFQModule",
    "BitBudget",
    "UnsupportedModuleError",
    "allocate_bits",
    "load_quantized",
    "prepare",
    "quantize",
    "register",
    "save_quantized",
    "set_quantization",
]

_LIGHTNING_NAMES = {"ADFQCallback", "ADFQModule"}


def __getattr__(name: str):
    if name not in _LIGHTNING_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import lightning

    return getattr(lightning, name)
