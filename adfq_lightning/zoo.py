"""Small reference Vision Transformers for 32x32 CIFAR-10, built from timm's own classes.

They stand in for ImageNet checkpoints: small enough to train on a CPU in minutes, yet made of
timm's standard ``Attention`` / ``Mlp`` / Swin ``WindowAttention`` blocks, so the quantizer sees
exactly the module types it sees in real timm models.  The fp16 weights shipped in
``adfq_lightning/assets/<name>.pt`` are produced by ``recipes/train_reference.py``.
"""

from __future__ import annotations

from importlib import resources
from typing import Callable, Optional

import timm
import torch
from torch import nn
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_CLASSES",
    "REFERENCE_MODELS",
    "cifar10_pretrained_cfg",
    "create_model",
    "create_reference_model",
    "reference_asset_path",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
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


def reference_asset_path(name: str):
    """Location of the shipped fp16 checkpoint (an ``importlib.resources`` Traversable)."""
    return resources.files("adfq_lightning").joinpath("assets").joinpath(f"{name}.pt")


def create_reference_model(name: str, pretrained: bool = False, **overrides) -> nn.Module:
    """Build reference model ``name``; with ``pretrained`` load the shipped fp16 weights as float32.

    ``overrides`` change constructor arguments that keep the weights' shapes (e.g. ``drop_path_rate``)."""
    if name not in REFERENCE_MODELS:
        raise ValueError(f"Unknown reference model {name!r}; choose from {sorted(REFERENCE_MODELS)}.")
    model = REFERENCE_MODELS[name](**overrides)
    model.pretrained_cfg = model.default_cfg = cifar10_pretrained_cfg(name)
    if pretrained:
        asset = reference_asset_path(name)
        if not asset.is_file():
            raise FileNotFoundError(
                f"No pretrained weights for {name!r} at adfq_lightning/assets/{name}.pt. "
                f"Train them with: python recipes/train_reference.py --model {name}"
            )
        with asset.open("rb") as f:
            state_dict = torch.load(f, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.eval()


def create_model(
    name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None, **kwargs
) -> nn.Module:
    """A reference CIFAR-10 model (``vit_cifar`` ...) or any timm model by name, in eval mode.

    ``pretrained=True`` takes timm's published weights (network or a populated Hugging Face cache);
    ``checkpoint_path`` loads a local state_dict instead (e.g. your own fine-tuned ViT).
    """
    if name in REFERENCE_MODELS:
        model = create_reference_model(name, pretrained=pretrained)
    else:
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except Exception as err:  # hub/network errors come as many types; unknown names are re-raised as is
            if not pretrained or "Unknown model" in str(err):
                raise
            raise RuntimeError(
                f"could not fetch pretrained weights for {name!r} ({type(err).__name__}: {err}). Offline? Put the "
                "weights in the Hugging Face cache and set HF_HUB_OFFLINE=1, or set pretrained: false and "
                "checkpoint_path: <local file>."
            ) from err
    if checkpoint_path:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"{checkpoint_path} has NaN/Inf values in {bad[:5]}: the checkpoint is corrupt.")
        try:
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        except RuntimeError as err:  # torch's missing/unexpected/size-mismatch report
            raise ValueError(f"{checkpoint_path} does not fit {name!r} built with {kwargs or 'its defaults'}: build the "
                             f"model it was trained as (model_kwargs: num_classes, img_size, ...). {err}") from err
    return model.eval()
