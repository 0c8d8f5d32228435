"""CIFAR-10, the project's offline stand-in for ImageNet: archive location, offline bundle, transforms.

The 50,000-image training archive is decoded once (:mod:`.decode`), then split deterministically
(:func:`.splits.split_indices`) into 45,000 images for training reference models and drawing calibration
images, and 5,000 validation images (500 per class). A bundle of 1,024 calibration + 5,000 validation
images ships inside the package so quantization runs need neither the archive nor a network.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import timm.data
import torch
from torchvision.transforms import v2

from ..atomic import atomic_torch_save
from .decode import decode_image_folder
from .splits import calibration_indices, split_indices

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "build_bundle",
    "default_archive",
    "cifar10_eval_transform",
    "cifar10_train_transform",
    "default_bundle_path",
    "load_bundle",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

#: environment variable naming the CIFAR-10 training archive when none is given
ARCHIVE_ENV = "ADFQ_CIFAR10_ARCHIVE"


def default_archive() -> Path:
    """The CIFAR-10 training archive used when none is given, resolved when it is needed (never at import):
    ``$ADFQ_CIFAR10_ARCHIVE``, else ``shared/data/cifar10/train.tar.gz`` beside a source checkout."""
    if os.environ.get(ARCHIVE_ENV):
        return Path(os.environ[ARCHIVE_ENV])
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10" / "train.tar.gz"


def __getattr__(name: str):
    if name == "DEFAULT_ARCHIVE":  # the former constant, resolved on use
        return default_archive()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_bundle_path():
    """The offline bundle shipped with the package (an ``importlib.resources`` Traversable)."""
    return resources.files("adfq_lightning").joinpath("assets").joinpath("cifar10_bundle.pt")


# --------------------------------------------------------------------------------------------
# Decoding an ImageFolder tree (tar archive or directory) into a tensor cache
# --------------------------------------------------------------------------------------------


def build_bundle(
    source: str | Path | None = None,
    path: str | Path | None = None,
    num_calib: int = 1024,
    val_per_class: int = 500,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> Path:
    """Write the offline bundle: ``num_calib`` calibration images drawn (with ``seed``) from the
    training part and all validation images of the fixed :func:`split_indices` split, as uint8
    tensors + int64 labels + class names.

    Default ``path`` is ``adfq_lightning/assets/cifar10_bundle.pt`` in the source tree.
    """
    data = decode_image_folder(source or default_archive(), "train", cache_dir)
    train_idx, val_idx = split_indices(data.labels, val_per_class)
    calib_idx = calibration_indices(data.labels, num_calib, seed, candidates=train_idx)
    path = Path(path) if path else Path(__file__).parent / "assets" / "cifar10_bundle.pt"
    atomic_torch_save({
        "calib_images": data.images[calib_idx].clone(),
        "calib_labels": data.labels[calib_idx].clone(),
        "val_images": data.images[val_idx].clone(),
        "val_labels": data.labels[val_idx].clone(),
        "classes": list(data.classes),
        "calib_seed": seed,
        "val_per_class": val_per_class,
    }, path)
    return path


def load_bundle(path: str | Path | None = None) -> dict:
    """Load a bundle written by :func:`build_bundle` (default: the shipped one)."""
    source = Path(path) if path else default_bundle_path()
    if not source.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 bundle not found at {source}; build it with "
            "python -c 'from adfq_lightning.data import build_bundle; build_bundle()'"
        )
    with source.open("rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def _cifar10_data_config(data_config: dict | None) -> dict:
    return data_config or {"input_size": (3, 32, 32), "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
                           "interpolation": "bicubic"}


def cifar10_eval_transform(data_config: dict | None = None) -> v2.Compose:
    """uint8 32x32 tensor -> normalised float with the model's mean/std (default CIFAR-10's);
    resized only when the model's ``input_size`` is not 32x32."""
    cfg = _cifar10_data_config(data_config)
    steps = []
    if tuple(cfg["input_size"][-2:]) != (32, 32):
        interpolation = timm.data.transforms.str_to_interp_mode(cfg.get("interpolation", "bicubic"))
        steps.append(v2.Resize(tuple(cfg["input_size"][-2:]), interpolation=interpolation, antialias=True))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg["mean"], cfg["std"])]
    return v2.Compose(steps)


def cifar10_train_transform(data_config: dict | None = None) -> v2.Compose:
    """Light training augmentation: random 32x32 crop with 4-pixel padding + horizontal flip."""
    return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                       cifar10_eval_transform(data_config)])
