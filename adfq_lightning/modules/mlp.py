"""Quantized timm ``Mlp``: PPOQ on the fc1 input, Shift-Log2 on the post-GELU fc2 input."""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn

from ..config import ADFQConfig
from .linear import QuantLinear
from .registry import UnsupportedModuleError, register


@register(Mlp)
class QuantMlp(nn.Module):
    def __init__(self, mlp: Mlp, config: ADFQConfig, name: str) -> None:
        super().__init__()
        if not isinstance(mlp.fc1, nn.Linear):
            raise UnsupportedModuleError(f"{name}: timm Mlp with use_conv=True is not supported.")
        self.fc1 = QuantLinear(mlp.fc1, config, f"{name}.fc1", role="fc1_input")
        self.act, self.drop1, self.norm = mlp.act, mlp.drop1, mlp.norm
        self.fc2 = QuantLinear(mlp.fc2, config, f"{name}.fc2", role="fc2_input")
        self.drop2 = mlp.drop2

    @classmethod
    def from_float(cls, module: Mlp, config: ADFQConfig, name: str) -> "QuantMlp":
        return cls(module, config, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.drop1(self.act(self.fc1(x))))
        return self.drop2(self.fc2(x))
