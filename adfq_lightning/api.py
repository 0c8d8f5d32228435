"""One-call public API: ``quantize(model, calib_data, ADFQConfig(...))``, plus save/load of quantized models."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from .config import ADFQConfig
from .modules import convert, is_quantized
from .report import atomic_torch_save
from .reconstruction import Reconstructor, check_supported, set_quantization

CalibData = Union[torch.Tensor, Iterable]

__all__ = ["ADFQConfig", "collect_images", "load_quantized", "quantize", "save_quantized", "set_quantization"]


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


def is_converted(model: nn.Module) -> bool:
    return any(is_quantized(m) for m in model.modules())


def prepare(model: nn.Module, config: ADFQConfig) -> nn.Module:
    """Swap in the quantized modules (in place) without calibrating: what a checkpoint is loaded into."""
    check_supported(model)
    if not is_converted(model):
        convert(model, config)
    return model


def quantize(
    model: nn.Module,
    calib_data: CalibData,
    config: Optional[ADFQConfig] = None,
    *,
    sample_ids: Optional[torch.Tensor] = None,
    num_samples: Optional[int] = None,
    log: Optional[Callable[[str, int, dict], None]] = None,
) -> nn.Module:
    """Quantize a timm ViT/DeiT/Swin **in place** and return it (like torchao's ``quantize_``).

    Float modules are swapped for quantized ones, weight quantizers are searched, activation quantizers
    are calibrated module by module on inputs carried forward from the previous module, and, when
    ``config.reconstruct`` is set, ASMO reconstruction learns rounding and step sizes. Switch back to float
    behaviour with ``set_quantization(model, False)``.

    Under ``torch.distributed``, pass each rank's shard as ``calib_data`` with the global ``sample_ids`` of
    its images and the global ``num_samples``.
    """
    config = config or ADFQConfig()
    if torch.is_inference_mode_enabled():
        raise RuntimeError("quantize() cannot calibrate under torch.inference_mode(): reconstruction needs "
                           "autograd. Call it outside inference mode (torch.no_grad() is fine).")
    check_supported(model)
    images = collect_images(calib_data)
    if sample_ids is None:
        sample_ids = torch.arange(images.shape[0])
    num_samples = int(num_samples if num_samples is not None else images.shape[0])
    model.eval()
    prepare(model, config)
    Reconstructor(model, config, images, sample_ids, num_samples).run(log=log)
    return model


def save_quantized(model: nn.Module, path: Union[str, Path], config: ADFQConfig, model_name: str = "") -> None:
    """Save a quantized model's state with its config; loads with ``torch.load(weights_only=True)``."""
    if not is_converted(model):
        raise ValueError("save_quantized() needs a quantized model: run quantize() first.")
    atomic_torch_save({"format": "adfq-lightning/1", "model_name": model_name or type(model).__name__,
                  "config": config.to_dict(), "state_dict": model.state_dict()}, path)


def load_quantized(model: nn.Module, path: Union[str, Path], model_name: str = "") -> nn.Module:
    """Load a file written by :func:`save_quantized` into a float model of the same architecture (in place)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "adfq-lightning/1":
        raise ValueError(f"{path} is not an adfq-lightning quantized model file (save it with save_quantized()).")
    expected = model_name or type(model).__name__
    if blob["model_name"] != expected:
        raise ValueError(f"{path} holds a quantized {blob['model_name']}, not a {expected}: load it into the same model.")
    config = ADFQConfig(**blob["config"])
    prepare(model, config)
    missing, unexpected = model.load_state_dict(blob["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match this model (missing {missing[:3]}..., unexpected {unexpected[:3]}...): "
                         f"it was saved for another architecture or bit-width.")
    model.eval()
    return model
