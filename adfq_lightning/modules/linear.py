"""Quantized Linear and Conv2d: fake-quantized weight and input, otherwise the float layer's own math."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ADFQConfig, Role
from ..quantizers import Quantizer
from .registry import register


def _attach(layer: nn.Module, float_layer: nn.Module, config: ADFQConfig, name: str, role: Role) -> None:
    """Share the float layer's parameters and add the two quantizers (the weight grid is searched by
    :func:`calibrate_weights`, so that a model built only to load a quantized state skips the search)."""
    layer.weight, layer.bias = float_layer.weight, float_layer.bias
    layer.weight_quantizer = config.weight_quantizer(name)
    layer.input_quantizer = config.activation_quantizer(name, role)


def calibrate_weights(model: nn.Module) -> None:
    """Search the grid of every weight quantizer that has none yet (nearest rounding until reconstruction)."""
    for layer in model.modules():
        if isinstance(layer, (QuantLinear, QuantConv2d)) and not bool(layer.weight_quantizer.calibrated):
            layer.weight_quantizer.calibrate(layer.weight.detach())


@register(nn.Linear)
class QuantLinear(nn.Linear):
    """``nn.Linear`` with a weight quantizer (AdaRound) and an input quantizer chosen by the layer's role."""

    weight_quantizer: Quantizer
    input_quantizer: Quantizer

    def __init__(self, linear: nn.Linear, config: ADFQConfig, name: str, role: Role = "input") -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        _attach(self, linear, config, name, role)

    @classmethod
    def from_float(cls, module: nn.Linear, config: ADFQConfig, name: str, role: Role = "input") -> "QuantLinear":
        return cls(module, config, name, role)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


@register(nn.Conv2d)
class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` (patch embedding) with quantized weight and input."""

    weight_quantizer: Quantizer
    input_quantizer: Quantizer

    def __init__(self, conv: nn.Conv2d, config: ADFQConfig, name: str) -> None:
        nn.Module.__init__(self)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(conv, attr))
        _attach(self, conv, config, name, "input")

    @classmethod
    def from_float(cls, module: nn.Conv2d, config: ADFQConfig, name: str) -> "QuantConv2d":
        return cls(module, config, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)
