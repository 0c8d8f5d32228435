"""Quantized matrix product of two activations (q @ k^T, attn @ v)."""

from __future__ import annotations

import torch
from torch import nn

from ..quantizers import Quantizer


class QuantMatMul(nn.Module):
    """``a @ b`` with each operand passed through its own quantizer."""

    def __init__(self, a_quantizer: Quantizer, b_quantizer: Quantizer) -> None:
        super().__init__()
        self.a_quantizer = a_quantizer
        self.b_quantizer = b_quantizer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quantizer(a) @ self.b_quantizer(b)
