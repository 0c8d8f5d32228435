"""The deployable form of a quantized model: integer weights and frozen activation quantizers.

:func:`deploy` swaps, in place, every ``QuantLinear``/``QuantConv2d`` for an :class:`IntLinear`/:class:`IntConv2d`
(weight codes with AdaRound's decisions folded in, per-channel scale and zero point) and every activation
quantizer for its frozen counterpart. The attention and MLP wrappers stay: they call the same children.

The frozen modules hold buffers only, no calibration state and no straight-through terms, and their forward
is free of Python branches on tensors, so a deployed model traces with ``torch.export`` and exports to ONNX:

* weights -> ``adfq::dequantize_weight`` of the uint8 codes -> ``DequantizeLinear`` (per output channel);
* uniform activations (per tensor, per token) -> ``adfq::quantize_dequantize`` -> ``QuantizeLinear`` /
  ``DequantizeLinear``; a b-bit grid is first clipped (``Min``/``Max``) to the values its 2**b levels
  represent, after which 8-bit (uint8) rounding gives the same codes;
* per-patch outlier -> ``Abs``, ``Greater``, ``Where`` around the per-token QDQ;
* log-sqrt(2) / Shift-Log2 -> ``Add``, ``Log``, ``Round``, ``Pow``, ``Where``: no runtime has a log-domain
  quantize op, so every runtime needs this decomposition.

Every frozen quantizer rounds exactly as its fake-quant original (``x * (1 / scale)``, round half to even),
so the deployed model reproduces the fake-quant model's outputs (:mod:`.ops`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import QuantConv2d, QuantLinear
from ..quantizers import (
    AdaRoundQuantizer,
    activation_quantizers,
    BestOfQuantizer,
    LogQuantizer,
    PerPatchOutlierQuantizer,
    Quantizer,
    UniformQuantizer,
    log_levels,
)
from .ops import dequantize_weight, quantize_dequantize

__all__ = ["FrozenLog", "FrozenOutlierUniform", "FrozenUniform", "IntConv2d", "IntLinear", "deploy", "is_deployed"]

class _Frozen(nn.Module):
    """Buffers adopt the shapes of a loaded state (they are placeholders until then)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, tensor in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if tensor is not None and saved is not None and saved.shape != tensor.shape:
                self._buffers[name] = tensor.new_empty(saved.shape, dtype=saved.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FrozenUniform(_Frozen):
    """b-bit uniform quantization, per tensor (``per_token=False``) or per token (dim -2), as QDQ ops."""

    def __init__(self, bits: int, per_token: bool) -> None:
        super().__init__()
        self.bits, self.per_token = bits, per_token
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.uint8))
        self._derive()

    def _derive(self) -> None:
        """Non-persistent buffers the forward reads: the end points of the b-bit grid."""
        zero_point = self.zero_point.float()
        self.register_buffer("low", -zero_point * self.scale, persistent=False)
        self.register_buffer("high", (2**self.bits - 1 - zero_point) * self.scale, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._derive()

    @classmethod
    def from_quantizer(cls, q: UniformQuantizer) -> "FrozenUniform":
        frozen = cls(q.bits, q.granularity == "token")
        scale = q.scale.detach().abs().clamp(min=1e-8).float()
        frozen.scale = scale.flatten() if frozen.per_token else scale.reshape(())
        frozen.zero_point = q.zero_point.detach().reshape(frozen.scale.shape).to(torch.uint8)
        frozen._derive()
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = x.dim() - 2 if self.per_token else -1
        return quantize_dequantize(x, self.scale, self.zero_point, self.low, self.high, axis)


class FrozenOutlierUniform(FrozenUniform):
    """Per-patch outlier-aware quantization: values with ``|x| > threshold`` pass at full precision."""

    def __init__(self, bits: int, per_token: bool = True, threshold: float = 5.0) -> None:
        super().__init__(bits, per_token)
        self.threshold = threshold

    @classmethod
    def from_quantizer(cls, q: PerPatchOutlierQuantizer) -> "FrozenOutlierUniform":
        frozen = super().from_quantizer(q)
        frozen.threshold = q.threshold
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outliers = x.abs() > self.threshold
        return torch.where(outliers, x, super().forward(x.masked_fill(outliers, 0.0)))


class FrozenLog(_Frozen):
    """``delta * 2**(-k/m)`` levels (``m`` = 2 for log-sqrt(2), 1 for log2) after a constant shift, plus zero."""

    def __init__(self, bits: int, steps_per_octave: int) -> None:
        super().__init__()
        self.levels, self.steps_per_octave = 2**bits, steps_per_octave
        self.register_buffer("delta", torch.ones(()))
        self.register_buffer("shift", torch.zeros(()))

    @classmethod
    def from_quantizer(cls, q: LogQuantizer) -> "FrozenLog":
        frozen = cls(q.bits, q._steps_per_octave)
        frozen.delta = q.delta.detach().abs().clamp(min=1e-8).reshape(()).float()
        frozen.shift = q.shift.detach().reshape(()).float()
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_levels(x + self.shift, self.delta, self.levels, self.steps_per_octave)[0] - self.shift


class _IntWeight(_Frozen):
    """Integer weight codes (AdaRound decisions folded in) with per-output-channel scale and zero point."""

    def _init_weight(self, layer: nn.Module, bias: Optional[torch.Tensor]) -> None:
        self.bits = layer.weight_quantizer.bits
        self.register_buffer("weight_codes", torch.zeros((), dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(()))
        self.register_buffer("weight_zero_point", torch.zeros((), dtype=torch.uint8))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        if bool(layer.weight_quantizer.calibrated):
            self.weight_codes, self.weight_scale, self.weight_zero_point = weight_codes(
                layer.weight_quantizer, layer.weight.detach())
        self.input_quantizer = frozen_quantizer(layer.input_quantizer)

    def quantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self.weight_codes, self.weight_scale, self.weight_zero_point)


class IntLinear(_IntWeight):
    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._init_weight(layer, layer.quantized_bias())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


class IntConv2d(_IntWeight):
    def __init__(self, layer: QuantConv2d) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
        if layer.padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={layer.padding_mode!r}: only zero padding deploys.")
        self._init_weight(layer, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.input_quantizer(x), self.quantized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


@torch.no_grad()
def weight_codes(q: AdaRoundQuantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8, scale per output channel, zero point per output channel) of the hard-rounded weight."""
    scale, zero_point = q.grid.scale.detach().float(), q.grid.zero_point.detach().float()
    codes = (torch.floor(w / scale) + q.rounding().detach() + zero_point).clamp(0, q.levels - 1)
    channels = w.shape[0]
    per_channel = lambda t: t.reshape(-1).expand(channels).contiguous()  # noqa: E731 (per-tensor grids too)
    return codes.to(torch.uint8), per_channel(scale), per_channel(zero_point).to(torch.uint8)


def frozen_quantizer(q: Quantizer) -> nn.Module:
    """The frozen counterpart of an activation quantizer (by type: the most specific first)."""
    if isinstance(q, BestOfQuantizer):
        return frozen_quantizer(q.chosen)
    if isinstance(q, PerPatchOutlierQuantizer):
        return FrozenOutlierUniform.from_quantizer(q) if q._ready else FrozenOutlierUniform(q.bits, threshold=q.threshold)
    if isinstance(q, UniformQuantizer):
        return FrozenUniform.from_quantizer(q) if q._ready else FrozenUniform(q.bits, q.granularity == "token")
    if isinstance(q, LogQuantizer):
        return FrozenLog.from_quantizer(q) if q._ready else FrozenLog(q.bits, q._steps_per_octave)
    raise TypeError(f"{type(q).__name__} has no frozen counterpart to deploy; register one in "
                    "adfq_lightning.export.deployed.frozen_quantizer.")


def is_deployed(model: nn.Module) -> bool:
    return any(isinstance(m, _IntWeight) for m in model.modules())


def deploy(model: nn.Module, require_calibrated: bool = True) -> nn.Module:
    """Turn a quantized model into its deployable form, in place (see the module docstring).

    With ``require_calibrated=False`` an uncalibrated structure is built, whose buffers take their values and
    shapes from a ``load_state_dict`` (what :func:`~adfq_lightning.export.load_exported` does).
    """
    acts = activation_quantizers(model)
    if not acts:
        raise ValueError("deploy() needs a model quantized by adfq_lightning (quantize() it first).")
    if require_calibrated and not all(q._ready for q in acts):
        raise ValueError("this model is not calibrated: run adfq_lightning.quantize() (or load a quantized "
                         "checkpoint) before exporting it.")
    if not all(q.enabled for q in acts):
        raise ValueError("quantization is switched off in this model (set_quantization(model, False)): switch it "
                         "back on with set_quantization(model, True) before exporting.")
    layers = {id(m) for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    matmul_inputs = {id(q) for q in acts}
    for parent in [m for m in model.modules() if id(m) not in layers]:  # a layer's own quantizers go with it
        for child_name, child in list(parent.named_children()):
            if id(child) in layers:
                setattr(parent, child_name, IntLinear(child) if isinstance(child, QuantLinear) else IntConv2d(child))
            elif id(child) in matmul_inputs:
                setattr(parent, child_name, frozen_quantizer(child))
    return model.eval()
