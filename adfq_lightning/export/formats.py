"""Every export format from one call: ``stem.safetensors`` / ``.onnx`` / ``.pt2``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import timm.data
import torch
from torch import nn

from ..config import ADFQConfig
from .artifact import export_quantized
from .onnx import export_onnx
from .program import export_program

FORMATS = ("safetensors", "onnx", "pt2")
SUFFIXES = {"safetensors": ".safetensors", "onnx": ".onnx", "pt2": ".pt2"}


def example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A random batch at the model's input size (what tracing needs; the exports keep the batch size dynamic)."""
    size = timm.data.resolve_data_config(model=model)["input_size"]
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))


def export_all(model: nn.Module, stem: Path, formats: Sequence[str], config: Optional[ADFQConfig] = None,
               model_name: Optional[str] = None, model_kwargs: Optional[dict] = None) -> list[Path]:
    """Write ``stem.<suffix>`` for every format; every file is complete or absent. ``config``, ``model_name`` and
    ``model_kwargs`` default to the model's recipe (see :func:`export_quantized`)."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}: choose from {list(FORMATS)}.")
    example = example_input(model).to(next(model.parameters()).device)
    writers = {"safetensors": lambda p: export_quantized(model, p, config, model_name, model_kwargs),
               "onnx": lambda p: export_onnx(model, p, example),
               "pt2": lambda p: export_program(model, p, example)}
    return [writers[fmt](stem.with_name(stem.name + SUFFIXES[fmt])) for fmt in formats]
