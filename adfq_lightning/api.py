"""One-call public API: ``quantize(model, calib_data, ADFQConfig(...))`` and ``prepare`` (swap modules only)."""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

import torch
from torch import nn

from .allocation import BitBudget, allocate_bits
from .config import ADFQConfig
from .data.calibration import CalibData, collect_images, record_inputs
from .modules import calibrate_weights, convert, is_calibrated, is_converted
from .quantizers import set_quantization
from .reconstruction import Reconstructor, check_supported
from .reconstruction.cross_rank import broadcast_object, world
from .recipe import attach_config, display_name
from .quantization_report import build_report, summarize

__all__ = ["ADFQConfig", "prepare", "quantize", "set_quantization"]


def _check_images(model: nn.Module, images: torch.Tensor) -> None:
    """Refuse calibration images the model cannot take, naming the fix (before any module is swapped);
    warn about images that look unnormalised."""
    if not images.is_floating_point() or (images.min() >= 0 and images.max() > 2.0):
        warnings.warn(f"the calibration images look unnormalised ({images.dtype}, values {float(images.min()):g} to "
                      f"{float(images.max()):g}): calibrate on images as the model sees them at inference, e.g. "
                      "timm.data.create_transform(**timm.data.resolve_data_config(model=model)).", stacklevel=3)
    if not torch.isfinite(images).all():
        raise ValueError("calibration images contain NaN or Inf values: check the data pipeline "
                         "(decoding, normalisation) before calibrating.")
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    channels = getattr(proj, "in_channels", None)
    if channels is not None and images.shape[1] != channels:
        raise ValueError(
            f"calibration images have {images.shape[1]} channel(s) but {type(model).__name__} takes {channels}: "
            "convert grayscale/RGBA images to RGB first (PIL: image.convert('RGB'); the datamodules do it).")
    size = getattr(model.patch_embed, "img_size", None) if channels is not None else None
    if size is not None and getattr(model.patch_embed, "strict_img_size", False) and tuple(images.shape[-2:]) != tuple(size):
        raise ValueError(
            f"calibration images are {tuple(images.shape[-2:])} but {type(model).__name__} takes {tuple(size)}: "
            "resize them with the model's own transform (timm.data.resolve_data_config(model=model)).")


def prepare(model: nn.Module, config: ADFQConfig) -> nn.Module:
    """Swap in the quantized modules (in place) and search their weight grids, without calibrating activations:
    what :func:`quantize` starts from and what a checkpoint is loaded into.

    The model keeps ``config`` with its architecture and constructor arguments as its recipe
    (:func:`~adfq_lightning.recipe.model_recipe`): what :func:`~adfq_lightning.export.export_quantized` writes.
    """
    if config.bit_budget is not None:
        raise ValueError("bit_budget needs calibration images to allocate widths, which quantize(), ADFQModule and "
                         "ADFQCallback have and prepare() does not: allocate first, overrides = adfq_lightning."
                         "allocate_bits(model, images, BitBudget(...), config), then prepare with config.replace("
                         "bit_budget=None, overrides={**config.overrides, **overrides}).")
    check_supported(model)
    if not is_converted(model):
        _check_weights(model)
        attach_config(model, config)
        convert(model, config)
    else:
        attach_config(model, config)
    calibrate_weights(model)
    return model


def allocated_config(model: nn.Module, images: torch.Tensor, config: ADFQConfig) -> tuple[ADFQConfig, dict]:
    """``config`` with the widths :func:`allocate_bits` chose under its ``bit_budget`` as ``overrides`` (the
    budget itself dropped), and the allocation's report. Under a process group every rank measures on its own
    images and takes rank 0's choice, so that all quantize alike."""
    plain = config.replace(bit_budget=None)
    allocated, allocation = broadcast_object(allocate_bits(model, images, BitBudget(**config.bit_budget), plain,
                                                           report=True), "broadcast of rank 0's bit allocation")
    return plain.replace(overrides={**plain.overrides, **allocated}), allocation


def _check_weights(model: nn.Module) -> None:
    """Refuse NaN/Inf Linear/Conv weights before any module is swapped (the float model is left as it was)."""
    for name, layer in model.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and not torch.isfinite(layer.weight).all():
            raise ValueError(f"Quantizer {name}.weight received NaN or Inf values: check the model weights (a corrupt "
                             "checkpoint or a diverged training run) before quantizing.")


def quantize(
    model: nn.Module,
    calib_data: Optional[CalibData] = None,
    config: Optional[ADFQConfig] = None,
    *,
    num_calib: Optional[int] = None,
    forward_loop: Optional[Callable[[nn.Module], None]] = None,
    sample_ids: Optional[torch.Tensor] = None,
    num_samples: Optional[int] = None,
    log: Optional[Callable[[str, int, dict], None]] = None,
    report: bool = False,
    verbose: bool = True,
) -> Union[nn.Module, tuple[nn.Module, dict]]:
    """Quantize a timm ViT/DeiT/Swin **in place** and return it (like torchao's ``quantize_``).

    Float modules are swapped for quantized ones, weight quantizers are searched, activation quantizers
    are calibrated module by module on inputs carried forward from the previous module, and, when
    ``config.reconstruct`` is set, ASMO reconstruction learns rounding and step sizes. Switch back to float
    behaviour with ``set_quantization(model, False)``.

    Calibration images: ``calib_data`` (a tensor, or an iterable of batches read only up to ``num_calib``
    images, e.g. an ImageNet train loader), or ``forward_loop(model)``, which runs the float model the way your
    pipeline does (ModelOpt's ``forward_loop``): the images reaching the model's ``forward`` are recorded,
    up to ``num_calib``. Under ``torch.distributed``, pass each rank's shard as ``calib_data`` with the global
    ``sample_ids`` of its images and the global ``num_samples``.

    With ``report=True`` it returns ``(model, report)``: the run's report, the dict ``ADFQCallback`` and
    ``ADFQModule`` write as ``adfq_report.json`` (config, versions, an ``overview`` and per-module ``modules``
    entries: held-out error before/after reconstruction, soft error, undecided rounding, reverted by the
    safeguard...). ``verbose`` prints its short summary (on rank 0) at the end.
    """
    config = config or ADFQConfig()
    if torch.is_inference_mode_enabled():
        raise RuntimeError("quantize() cannot calibrate under torch.inference_mode(): reconstruction needs "
                           "autograd. Call it outside inference mode (torch.no_grad() is fine).")
    if (calib_data is None) == (forward_loop is None):
        raise ValueError("quantize() takes calibration images from calib_data or from forward_loop: pass one of them.")
    if num_calib is not None and (isinstance(num_calib, bool) or not isinstance(num_calib, int) or num_calib < 1):
        raise ValueError(f"num_calib={num_calib!r} must be a positive integer (1024 in the paper).")
    check_supported(model)
    if is_calibrated(model):
        raise ValueError("this model is already quantized: quantize() starts from the float model. Reload the float "
                         "weights to quantize with another config; use set_quantization() to toggle float/quantized.")
    if forward_loop is not None:
        images = record_inputs(model, forward_loop, num_calib)
    else:
        images = collect_images(calib_data, limit=num_calib)
    _check_images(model, images)
    if sample_ids is None:
        sample_ids = torch.arange(images.shape[0])
    num_samples = int(num_samples if num_samples is not None else images.shape[0])
    model.eval()
    allocation = None
    if config.bit_budget is not None:
        config, allocation = allocated_config(model, images, config)
    prepare(model, config)
    engine = Reconstructor(model, config, images, sample_ids, num_samples)
    engine.run(log=log)
    result = build_report(config, engine.stages, display_name(model), world()[1], allocation=allocation)
    if verbose and world()[0] == 0:
        print(summarize(result, "returned by quantize(..., report=True)" if report else
                        "quantize(..., report=True) returns it"))
    return (model, result) if report else model
