"""Images for calibration and evaluation, in plain PyTorch: decoding and caching, splits, the CIFAR-10 bundle.

The LightningDataModules built on them live in :mod:`adfq_lightning.lightning.datamodules`.
"""

from __future__ import annotations

import warnings

from .cifar10 import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    build_bundle,
    cifar10_eval_transform,
    cifar10_train_transform,
    default_archive,
    default_bundle_path,
    load_bundle,
)
from .datasets import TensorImageDataset
from .decode import CorruptImageError, LabeledImages, decode_image_folder, default_cache_dir, load_image_file
from .splits import calibration_indices, split_indices

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DEFAULT_ARCHIVE",
    "CorruptImageError",
    "LabeledImages",
    "TensorImageDataset",
    "build_bundle",
    "calibration_indices",
    "cifar10_eval_transform",
    "cifar10_train_transform",
    "decode_image_folder",
    "default_archive",
    "default_bundle_path",
    "default_cache_dir",
    "load_bundle",
    "load_image_file",
    "split_indices",
]

#: Datamodules that lived here before 0.2; old YAML ``class_path``s keep working for one release.
_MOVED = {"CIFAR10DataModule", "ImageFolderDataModule"}


def __getattr__(name: str):
    if name == "DEFAULT_ARCHIVE":  # resolved on use, not at import
        return default_archive()
    if name in _MOVED:
        warnings.warn(f"adfq_lightning.data.{name} moved to adfq_lightning.lightning.{name}; the old path "
                      "goes away in 0.3 (update class_path in your configs).", DeprecationWarning, stacklevel=2)
        from ..lightning import datamodules

        return getattr(datamodules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
