"""One-call public API: ``quantize(model, calib_data, ADFQConfig(...))``, plus save/load of quantized models."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from .config import ADFQConfig
from .modules import convert, is_quantized
from .quantizers import Quantizer
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


def is_calibrated(model: nn.Module) -> bool:
    """True once activation quantizers hold calibrated (or loaded) parameters."""
    return any(bool(q.calibrated) for q in model.modules() if isinstance(q, Quantizer) and q.observes_activations)


def _check_images(model: nn.Module, images: torch.Tensor) -> None:
    """Refuse calibration images the model cannot take, naming the fix (before any module is swapped)."""
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
    _check_images(model, images)
    if is_calibrated(model):
        raise ValueError("this model is already quantized: quantize() starts from the float model. Reload the float "
                         "weights to quantize with another config; use set_quantization() to toggle float/quantized.")
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


#: Fields of ADFQConfig that decide which quantizers a model holds (the rest only steer calibration).
RECIPE_FIELDS = ("w_bits", "a_bits", "overrides", "method", "ppoq", "qkv_outlier_threshold", "fc1_outlier_threshold",
                 "slq", "slq_base", "log_softmax")


def _quantizer_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, Quantizer))


def _bits_mismatches(model: nn.Module, config: ADFQConfig) -> list[str]:
    """Quantizers of an already converted model whose bit-width differs from what ``config`` gives them."""
    found = []
    for q in model.modules():
        if isinstance(q, Quantizer) and "." in q.name:
            module_name, what = q.name.rsplit(".", 1)
            w_bits, a_bits = config.bits_for(module_name)
            expected = w_bits if what == "weight" else a_bits
            if q.bits != expected:
                found.append(f"{q.name} is {q.bits}-bit here, {expected}-bit in the file")
    return found


def load_quantized(model: nn.Module, path: Union[str, Path], model_name: str = "",
                   config: Optional[ADFQConfig] = None) -> nn.Module:
    """Load a file written by :func:`save_quantized` into a float model of the same architecture (in place).

    The file is read with ``torch.load(weights_only=True)`` and checked before the model is touched: its
    format, the model class, NaN/Inf values and the shape of every float tensor. With ``config`` given, a file
    made with another recipe (bit-widths, overrides, quantizer choices) is refused. Every refusal is a
    ``ValueError`` that says what differs.
    """
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a truncated zip, a pickle with code in it, not a torch file at all...
        raise ValueError(f"{path} could not be read as an adfq-lightning quantized model file ({type(err).__name__}: "
                         f"{err}): it is truncated, corrupt or not made by save_quantized().") from err
    if not isinstance(blob, dict) or blob.get("format") != "adfq-lightning/1":
        raise ValueError(f"{path} is not an adfq-lightning quantized model file (save it with save_quantized()).")
    expected = model_name or type(model).__name__
    if blob["model_name"] != expected:
        raise ValueError(f"{path} holds a quantized {blob['model_name']}, not a {expected}: load it into the same model.")
    saved = ADFQConfig(**blob["config"])
    if config is not None:
        differ = [f"{f}={getattr(saved, f)!r} in the file, {getattr(config, f)!r} asked"
                  for f in RECIPE_FIELDS if getattr(saved, f) != getattr(config, f)]
        if differ:
            raise ValueError(f"{path} was quantized W{saved.w_bits}A{saved.a_bits} with another recipe than the "
                             f"W{config.w_bits}A{config.a_bits} one asked for: {'; '.join(differ)}. Load the file "
                             "made with this config, or drop config= to take the file's own.")
    state = blob["state_dict"]
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path} has NaN/Inf values in {bad[:5]}: the file is corrupt; save it again from a "
                         "healthy quantized model.")
    owned = _quantizer_prefixes(model)  # quantizer scales are shaped at calibration: any saved shape is fine
    floats = {k: v for k, v in model.state_dict().items() if not k.startswith(owned)}
    shapes = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} here"
              for k, v in floats.items() if k in state and state[k].shape != v.shape]
    absent = [k for k in floats if k not in state]
    if shapes:
        raise ValueError(f"{path} does not fit this {expected} ({'; '.join(shapes[:3])}): it was saved for another "
                         "size of the architecture (depth, width, patch size, classes); build the same one to load it.")
    if absent:
        raise ValueError(f"{path} does not match this model (missing {absent[:3]}...): it was saved for another "
                         "architecture; build the same one to load it.")
    if is_converted(model):
        wrong = _bits_mismatches(model, saved)
        if wrong:
            raise ValueError(f"this model was already converted with other bit-widths than {path} "
                             f"({'; '.join(wrong[:3])}): load the file into a float model.")
    prepare(model, saved)
    keys = set(model.state_dict())
    missing, unexpected = sorted(keys - set(state)), sorted(set(state) - keys)
    if missing or unexpected:
        raise ValueError(f"{path} does not match this model (missing {missing[:3]}..., unexpected {unexpected[:3]}...): "
                         f"it was saved for another architecture or bit-width.")
    model.load_state_dict(state)
    model.eval()
    return model
