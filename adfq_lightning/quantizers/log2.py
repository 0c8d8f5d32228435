"""Logarithmic quantizers: log-sqrt(2) for softmax probabilities, Shift-Log2 for post-GELU activations."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .base import GradMode, Quantizer, quantile

Base = Literal["sqrt2", "2"]

#: Candidate top levels (as quantiles of the data) tried when calibrating the step.
TOP_QUANTILES = (0.999, 0.9999, 0.99999, 1.0)


def log_levels(y: torch.Tensor, delta: torch.Tensor, levels: int, steps_per_octave: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized values, level index k) of non-negative ``y`` on the grid ``delta * 2**(-k/m)``, k < levels.

    k < 0 is above the top level (clipped to ``delta``), k >= levels below the smallest (flushed to 0). The
    fake-quant and the deployed quantizer both compute it here, so they round every value alike.
    """
    k = (-(y.clamp(min=1e-30) / delta).log2() * steps_per_octave).round().detach()
    level = delta * torch.pow(2.0, -k.clamp(0, levels - 1) / steps_per_octave)
    return torch.where(k >= levels, torch.zeros_like(y), level), k


class LogQuantizer(Quantizer):
    """Quantize non-negative values to ``delta * base**-k``, ``k = 0 .. 2**bits - 1``, plus an exact zero.

    Levels are dense near zero, where most softmax and GELU mass lies. ``delta`` (the top level) is
    learnable; the integer exponent is detached and the input gradient follows ``grad`` (see
    :data:`~adfq_lightning.quantizers.base.GradMode`): with ``in_range`` none reaches values above the top
    level (clipped) or below the smallest level (flushed to zero). Levels are ``delta * 2 ** (-k / m)``,
    computed with ``pow`` so that the graph exports to ONNX (which has no ``exp2``).
    With ``shift=True`` a constant found at calibration (minus the smallest value seen, e.g. about 0.17
    after GELU) makes every value positive before quantization and is subtracted again afterwards: one
    fixed offset, not a per-batch minimum, so it can be folded on hardware.
    """

    def __init__(self, bits: int, base: Base = "sqrt2", shift: bool = False, grad: GradMode = "ste") -> None:
        super().__init__(bits, grad)
        if base not in ("sqrt2", "2"):
            raise ValueError(f"log base={base!r}: use 'sqrt2' or '2'.")
        self.base = base
        self.use_shift = shift
        self.delta = nn.Parameter(torch.ones(()))
        self.register_buffer("shift", torch.zeros(()))

    @property
    def _steps_per_octave(self) -> int:
        return 2 if self.base == "sqrt2" else 1

    def _levels_of(self, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return log_levels(y, delta, self.levels, self._steps_per_octave)[0]

    def init_from(self, x: torch.Tensor) -> None:
        if self.use_shift:
            self.shift.fill_(max(0.0, -float(x.min())))
        elif float(x.min()) < 0:
            raise ValueError(f"{self.name}: log quantization without shift needs non-negative inputs.")
        y = (x + self.shift).reshape(1, -1)
        best, best_err = None, None
        for q in TOP_QUANTILES:
            delta = quantile(y, q, 1)[0].clamp(min=1e-8)
            err = (self._levels_of(y, delta) - y).pow(2).mean()
            if best_err is None or err < best_err:
                best, best_err = delta, err
        self.delta.data = best.to(self.delta.dtype)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.shift
        value, k = log_levels(y, self.delta.abs().clamp(min=1e-8), self.levels, self._steps_per_octave)
        out = value - self.shift
        if self.grad == "ste":
            return out + (x - x.detach())
        if self.grad == "in_range":
            return out + (x - x.detach()) * ((k >= 0) & (k < self.levels))
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.base}, shift={self.use_shift}"


class LogSqrt2Quantizer(LogQuantizer):
    """log-sqrt(2) quantizer for post-softmax attention probabilities (values in [0, 1])."""

    def __init__(self, bits: int, grad: GradMode = "ste") -> None:
        super().__init__(bits, base="sqrt2", shift=False, grad=grad)


class ShiftLog2Quantizer(LogQuantizer):
    """Shift-Log2 Quantizer (SLQ) for post-GELU activations: shift positive, log-quantize, shift back."""

    def __init__(self, bits: int, base: Base = "sqrt2", grad: GradMode = "ste") -> None:
        super().__init__(bits, base=base, shift=True, grad=grad)
