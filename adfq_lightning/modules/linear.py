"""Quantized Linear and Conv2d: fake-quantized weight and input, otherwise the float layer's own math."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ADFQConfig
from ..quantizers import Quantizer
from .factory import Role, activation_quantizer, weight_quantizer
from .registry import register


def _attach(layer: nn.Module, float_layer: nn.Module, config: ADFQConfig, name: str, role: Role) -> None:
    """Share the float layer's parameters and add the two quantizers (the weight grid is searched by
    :func:`calibrate_weights`, so that a model built only to load a quantized state skips the search)."""
    layer.weight, layer.bias = float_layer.weight, float_layer.bias
    layer.weight_quantizer = weight_quantizer(config, name)
    layer.input_quantizer = activation_quantizer(config, name, role)


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

    bias_correction: Optional[torch.Tensor]

    def __init__(self, linear: nn.Linear, config: ADFQConfig, name: str, role: Role = "input") -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        _attach(self, linear, config, name, role)
        # set by calibration with config.bias_correction; None (and absent from the state) otherwise
        self.register_buffer("bias_correction", None)
        self.register_load_state_dict_pre_hook(_make_room_for_bias_correction)

    @classmethod
    def from_float(cls, module: nn.Linear, config: ADFQConfig, name: str, role: Role = "input") -> "QuantLinear":
        return cls(module, config, name, role)

    @property
    def correctable(self) -> bool:
        """Only a layer with a bias is bias-corrected, so that a deployed model keeps the float model's tensors."""
        return self.bias is not None

    def quantized_bias(self) -> Optional[torch.Tensor]:
        """The bias of the quantized layer: the float bias plus the correction, when there is one."""
        return self.bias if self.bias_correction is None else self.bias + self.bias_correction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.quantized_bias() if self.weight_quantizer.enabled else self.bias
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), bias)


def _make_room_for_bias_correction(layer: QuantLinear, state_dict: dict, prefix: str, *_args) -> None:
    """A state saved after bias correction fills the (None) buffer of a freshly converted layer."""
    saved = state_dict.get(prefix + "bias_correction")
    if saved is not None and layer.bias_correction is None:
        layer.bias_correction = torch.zeros(layer.out_features, dtype=saved.dtype, device=layer.weight.device)


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
