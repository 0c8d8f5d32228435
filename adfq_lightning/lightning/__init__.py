"""The Lightning face of adfq-lightning: callback, LightningModule, progress, datamodules, run report, CLI.

Everything here is built on the pure-PyTorch core (``adfq_lightning.api``); importing the core never
imports this package.
"""

from .callback import ADFQCallback, load_quantized_checkpoint, load_quantized_vit
from .checkpoint_io import AtomicCheckpointIO
from .datamodules import CIFAR10DataModule, ImageFolderDataModule, ReconstructionSteps
from .export_callback import ExportQuantized
from .module import ADFQModule
from .progress import CalibrationProgress, ReconstructionProgressBar

__all__ = [
    "ADFQCallback",
    "ADFQModule",
    "AtomicCheckpointIO",
    "CIFAR10DataModule",
    "CalibrationProgress",
    "ExportQuantized",
    "ImageFolderDataModule",
    "ReconstructionProgressBar",
    "ReconstructionSteps",
    "load_quantized_checkpoint",
    "load_quantized_vit",
]
