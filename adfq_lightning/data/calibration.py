"""Calibration images from whatever a user has: a tensor, an iterable of batches, or a forward loop."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable, Optional, Union

import torch
from torch import nn

CalibData = Union[torch.Tensor, Iterable]

__all__ = ["CalibData", "collect_images", "record_inputs"]


def collect_images(calib_data: CalibData, limit: Optional[int] = None) -> torch.Tensor:
    """Stack calibration images from a tensor or an iterable of batches (tensors or (images, labels, ...))."""
    if isinstance(calib_data, torch.Tensor):
        images = calib_data
    else:
        batches = []
        for batch in calib_data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"calibration batches must be tensors or (images, labels) pairs, got {type(x).__name__}.")
            batches.append(x)
            if limit is not None and sum(b.shape[0] for b in batches) >= limit:
                break
        images = torch.cat(batches) if batches else torch.empty(0)
    if images.numel() == 0:
        raise ValueError("the calibration set is empty: pass at least one image (1024 is the method's default).")
    if images.dim() != 4:
        raise ValueError(f"calibration images must be (N, C, H, W), got shape {tuple(images.shape)}.")
    return images[:limit] if limit is not None else images


class _Enough(Exception):
    """Raised inside a forward pre-hook to stop a forward loop once enough images were recorded."""


@torch.no_grad()
def record_inputs(model: nn.Module, forward_loop: Callable[[nn.Module], None], limit: Optional[int] = None) -> torch.Tensor:
    """The image batches that reach ``model.forward`` while ``forward_loop(model)`` runs (up to ``limit``)."""
    batches: list[torch.Tensor] = []

    def record(_module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"forward_loop called the model with {type(x).__name__}: it must take an image tensor.")
        batches.append(x.detach().cpu())
        if limit is not None and sum(b.shape[0] for b in batches) >= limit:
            raise _Enough

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        forward_loop(model.eval())
    except _Enough:
        pass
    finally:
        handle.remove()
    return collect_images(batches, limit=limit)
