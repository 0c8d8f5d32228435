"""Small reference Vision Transformers for 32x32 CIFAR-10, built from timm's own classes.

They stand in for ImageNet checkpoints: small enough to quantize on a CPU in minutes, yet made of
timm's standard ``Attention`` / ``Mlp`` / Swin ``WindowAttention`` blocks, so the quantizer sees
exactly the module types it sees in real timm models.  The fp16 weights shipped in
``adfq_lightning/assets/<name>.pt`` are produced by ``recipes/train_reference.py``.

``<name>_outliers`` is the stress variant of each (:mod:`adfq_lightning.stress`): the same function, with
ImageNet-like outlier channels after its LayerNorms, chosen on the bundle's first 256 calibration images.
"""

from __future__ import annotations

from importlib import resources
from typing import Callable

import torch
from torch import nn
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .recipe import record_build
from .data.cifar10 import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, cifar10_eval_transform, load_bundle
from .stress import add_outlier_channels

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_CLASSES",
    "REFERENCE_MODELS",
    "cifar10_pretrained_cfg",
    "create_reference_model",
    "is_reference_model",
    "reference_asset_path",
]

NUM_CLASSES = len(CIFAR10_CLASSES)
IMG_SIZE = 32

# Shared ViT/DeiT trunk: 8x8 grid of 4x4 patches, sized to train ~12 epochs on 2 CPU cores
# in ~20 minutes (~0.2 s per 128-image step).
_VIT_KWARGS = dict(
    img_size=IMG_SIZE, patch_size=4, num_classes=NUM_CLASSES,
    embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0, drop_path_rate=0.05,
)
# Swin: 2x2 patches -> 16x16 tokens, 4x4 windows, three stages (16 -> 8 -> 4 tokens per side).
_SWIN_KWARGS = dict(
    img_size=IMG_SIZE, patch_size=2, num_classes=NUM_CLASSES, window_size=4,
    embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12), mlp_ratio=2.0, drop_path_rate=0.05,
)


def cifar10_pretrained_cfg(name: str) -> dict:
    """timm-style pretrained config so ``timm.data.resolve_data_config(model=m)`` yields CIFAR-10
    normalisation at 32x32 instead of timm's ImageNet/224 defaults."""
    return dict(
        architecture=name,
        num_classes=NUM_CLASSES,
        input_size=(3, IMG_SIZE, IMG_SIZE),
        interpolation="bicubic",
        crop_pct=1.0,
        crop_mode="center",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        label_names=CIFAR10_CLASSES,
    )


def _vit_cifar(**overrides) -> nn.Module:
    return VisionTransformer(**{**_VIT_KWARGS, **overrides})


def _deit_cifar(**overrides) -> nn.Module:
    """DeiT with the distillation token.  No teacher is available for CIFAR-10, so the recipe
    trains the distillation head on the hard labels as well (DeiT hard distillation with the
    ground truth standing in for the teacher); inference averages both heads, as in timm."""
    return VisionTransformerDistilled(**{**_VIT_KWARGS, **overrides})


def _swin_cifar(**overrides) -> nn.Module:
    return SwinTransformer(**{**_SWIN_KWARGS, **overrides})


REFERENCE_MODELS: dict[str, Callable[..., nn.Module]] = {
    "vit_cifar": _vit_cifar,
    "deit_cifar": _deit_cifar,
    "swin_cifar": _swin_cifar,
}
#: Stress variants: ``<reference model>_outliers`` (see the module docstring).
OUTLIER_SUFFIX = "_outliers"
STRESS_VARIANTS = tuple(f"{name}{OUTLIER_SUFFIX}" for name in REFERENCE_MODELS)


def reference_asset_path(name: str):
    """Location of the shipped fp16 checkpoint (an ``importlib.resources`` Traversable)."""
    return resources.files("adfq_lightning").joinpath("assets").joinpath(f"{name}.pt")


def is_reference_model(name: str) -> bool:
    """A reference CIFAR-10 model or its stress variant (else a timm model name)."""
    return name.removesuffix(OUTLIER_SUFFIX) in REFERENCE_MODELS


def create_reference_model(name: str, pretrained: bool = False, **overrides) -> nn.Module:
    """Build reference model ``name``; with ``pretrained`` load the shipped fp16 weights as float32.

    ``overrides`` change constructor arguments that keep the weights' shapes (e.g. ``drop_path_rate``)."""
    base = name.removesuffix(OUTLIER_SUFFIX)
    if base not in REFERENCE_MODELS:
        raise ValueError(f"Unknown reference model {name!r}; choose from {sorted(REFERENCE_MODELS) + list(STRESS_VARIANTS)}.")
    model = REFERENCE_MODELS[base](**overrides)
    model.pretrained_cfg = model.default_cfg = cifar10_pretrained_cfg(name)
    if pretrained:
        asset = reference_asset_path(base)
        if not asset.is_file():
            raise FileNotFoundError(
                f"No pretrained weights for {base!r} at adfq_lightning/assets/{base}.pt. "
                f"Train them with: python recipes/train_reference.py --model {base}"
            )
        with asset.open("rb") as f:
            state_dict = torch.load(f, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    if name != base:
        add_outlier_channels(model, cifar10_eval_transform()(load_bundle()["calib_images"][:256]))
    return record_build(model, name, overrides).eval()
