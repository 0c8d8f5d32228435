"""Build the model to quantize: a reference CIFAR-10 model or any timm model, with its weights."""

from __future__ import annotations

from typing import Optional

import timm
import torch
from torch import nn

from .zoo import create_reference_model, is_reference_model

__all__ = ["create_model"]


def create_model(
    name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None, **kwargs
) -> nn.Module:
    """A reference CIFAR-10 model (``vit_cifar`` ...) or any timm model by name, in eval mode.

    ``pretrained=True`` takes timm's published weights (network or a populated Hugging Face cache);
    ``checkpoint_path`` loads a local state_dict instead (e.g. your own fine-tuned ViT).
    """
    if is_reference_model(name):
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
