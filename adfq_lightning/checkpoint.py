"""Save and load a quantized model as a ``state_dict`` file (``torch.load(weights_only=True)``), with checks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .api import prepare
from .atomic import atomic_torch_save
from .config import ADFQConfig
from .modules import QuantLinear, is_converted
from .quantizers import Quantizer

__all__ = ["RECIPE_FIELDS", "load_quantized", "recipe_differences", "save_quantized"]


def save_quantized(model: nn.Module, path: Union[str, Path], config: ADFQConfig, model_name: str = "") -> None:
    """Save a quantized model's state with its config; loads with ``torch.load(weights_only=True)``."""
    if not is_converted(model):
        raise ValueError("save_quantized() needs a quantized model: run quantize() first.")
    atomic_torch_save({"format": "adfq-lightning/1", "model_name": model_name or type(model).__name__,
                  "config": config.to_dict(), "state_dict": model.state_dict()}, path)


#: Fields of ADFQConfig that decide which quantizers a model holds (the rest only steer calibration).
RECIPE_FIELDS = ("w_bits", "a_bits", "overrides", "method", "ppoq", "qkv_outlier_threshold", "fc1_outlier_threshold",
                 "slq", "slq_base", "log_softmax", "act_family")


def recipe_differences(saved: ADFQConfig, asked: ADFQConfig) -> list[str]:
    """What differs between two recipes in the fields that decide which quantizers a model holds."""
    found = []
    for f in RECIPE_FIELDS:
        a, b = getattr(saved, f), getattr(asked, f)
        if a == b:
            continue
        if f == "overrides":  # only the entries that differ (an allocation names every layer)
            found += [f"overrides[{k!r}]={a.get(k)!r} in the file, {b.get(k)!r} asked"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            found.append(f"{f}={a!r} in the file, {b!r} asked")
    return found


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
        differ = recipe_differences(saved, config)
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
    corrections = {f"{name}.bias_correction" for name, m in model.named_modules()  # saved only where corrected
                   if isinstance(m, QuantLinear) and m.correctable}
    missing, unexpected = sorted(keys - set(state)), sorted(set(state) - keys - corrections)
    if missing or unexpected:
        raise ValueError(f"{path} does not match this model (missing {missing[:3]}..., unexpected {unexpected[:3]}...): "
                         f"it was saved for another architecture or bit-width.")
    model.load_state_dict(state)
    model.eval()
    return model
