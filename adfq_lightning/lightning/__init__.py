"""The Lightning face of adfq-lightning: callback, LightningModule, progress, datamodules, run report, CLI.

Everything here is built on the pure-PyTorch core (``adfq_lightning.api``); importing the core never
imports this package.
"""

from .callback import ADFQCallback
from .checkpoint_io import AtomicCheckpointIO
from .datamodules import CIFAR10DataModule, ImageFolderDataModule
from .module import ADFQModule
from .progress import StageProgressBar

__all__ = [
    "ADFQCallback",
    "ADFQModule",
    "AtomicCheckpointIO",
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "StageProgressBar",
]
