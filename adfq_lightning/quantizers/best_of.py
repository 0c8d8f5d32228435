"""Bit-aware choice between a log grid and a uniform grid, by calibration error.

The log quantizers (Shift-Log2 on post-GELU activations, log-sqrt(2) on softmax probabilities) have the same
relative step at every bit width: at 4 bits their levels fit those long-tailed distributions better than a
uniform grid, but at 6-8 bits a uniform grid's finer steps win. ``BestOfQuantizer`` calibrates both on the same
data and keeps the one with the lower mean squared error (``family``), so the method's log grids are used where
they help and nowhere else.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Quantizer
from .log2 import LogQuantizer
from .uniform import UniformQuantizer

FAMILIES = ("log", "uniform")


class BestOfQuantizer(Quantizer):
    """A log quantizer and a uniform one; calibration keeps the one with the lower error on the data."""

    def __init__(self, log: LogQuantizer, uniform: UniformQuantizer) -> None:
        super().__init__(log.bits, log.grad)
        self.log, self.uniform = log, uniform
        self.register_buffer("uses_uniform", torch.tensor(False))
        self._uniform = False  # mirrors the buffer: forward branches on Python state only

    @property
    def family(self) -> str:
        return FAMILIES[int(self._uniform)]

    @property
    def chosen(self) -> Quantizer:
        return self.uniform if self._uniform else self.log

    def init_from(self, x: torch.Tensor) -> None:
        errors = []
        for q in (self.log, self.uniform):
            q.name = self.name
            q.calibrate(x)
            errors.append(float((q.fake_quantize(x) - x).pow(2).mean()))
        self._uniform = errors[1] < errors[0]
        self.uses_uniform.fill_(self._uniform)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.chosen.fake_quantize(x)

    def step_sizes(self) -> list[nn.Parameter]:
        return self.chosen.step_sizes()

    def candidate_step_sizes(self) -> list[nn.Parameter]:
        return self.log.step_sizes() + self.uniform.step_sizes()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._uniform = bool(self.uses_uniform)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, family={self.family if self._ready else 'not calibrated'}"
