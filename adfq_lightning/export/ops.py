"""The two operators of a deployed model, as ``torch.library`` custom ops.

Custom ops keep the deployed graph what it means: ``torch.export`` records them as single nodes (with dynamic
batch sizes, through their fake implementations) and the ONNX exporter translates them into the standard
``QuantizeLinear`` / ``DequantizeLinear`` nodes (:mod:`adfq_lightning.export.onnx`). Their eager kernels compute
exactly what the fake-quant modules compute, so every export reproduces the calibrated model.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dequantize_weight", "quantize_dequantize"]


def _broadcast(t: Tensor, x: Tensor, axis: int) -> Tensor:
    """A per-axis parameter shaped to broadcast against ``x`` (``axis < 0``: a per-tensor scalar)."""
    if axis < 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


@torch.library.custom_op("adfq::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: Tensor, scale: Tensor, zero_point: Tensor, low: Tensor, high: Tensor, axis: int) -> Tensor:
    """Round ``x`` to a uniform grid: per tensor (``axis=-1``) or per index of ``axis``.

    ``low``/``high`` are the grid's end points ``(0 - zp) * scale`` and ``(2**b - 1 - zp) * scale``: clipping to
    them first makes 8-bit rounding (what ``QuantizeLinear`` to uint8 does) give a b-bit grid's codes.
    """
    scale_b, zero_b = _broadcast(scale, x, axis), _broadcast(zero_point, x, axis).float()
    clipped = torch.maximum(torch.minimum(x, _broadcast(high, x, axis)), _broadcast(low, x, axis))
    return ((clipped * scale_b.reciprocal()).round() + zero_b - zero_b) * scale_b


@quantize_dequantize.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor, low: Tensor, high: Tensor, axis: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("adfq::dequantize_weight", mutates_args=())
def dequantize_weight(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """``(codes - zero_point) * scale`` per output channel (dim 0) of uint8 weight codes."""
    return (codes.float() - _broadcast(zero_point, codes, 0).float()) * _broadcast(scale, codes, 0)


@dequantize_weight.register_fake
def _(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return torch.empty_like(codes, dtype=torch.float32)
