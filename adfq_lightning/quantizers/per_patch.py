"""Per-Patch Outlier-aware Quantizer (PPOQ) for post-LayerNorm activations."""

from __future__ import annotations

import math

import torch

from .base import GradMode
from .uniform import Search, UniformQuantizer


class PerPatchOutlierQuantizer(UniformQuantizer):
    """Static per-patch (token position) uniform quantizer that keeps outliers in full precision.

    Post-LayerNorm activations of ViTs have a few huge values in a few channels; with them the per-patch
    range is dominated by outliers. Elements with ``|x| > threshold`` bypass quantization (their exact
    full-precision value is kept, a sparse side path on hardware) and are excluded from calibration.
    """

    def __init__(self, bits: int, threshold: float = 5.0, search: Search = "mse", percentile: float = 0.9999,
                 grad: GradMode = "ste") -> None:
        if not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold <= 0:
            raise ValueError(f"outlier threshold={threshold!r} must be a positive number (the reference uses 5 or 10).")
        super().__init__(bits, granularity="token", search=search, percentile=percentile, grad=grad)
        self.threshold = float(threshold)
        self.register_buffer("outlier_ratio", torch.zeros(()))

    def init_from(self, x: torch.Tensor) -> None:
        outliers = x.abs() > self.threshold
        self.outlier_ratio.fill_(outliers.float().mean())
        super().init_from(x.masked_fill(outliers, 0.0))

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        outliers = x.abs() > self.threshold
        exact = x.detach() if self.grad == "none" else x  # an outlier is represented exactly: in range
        return torch.where(outliers, exact, super().fake_quantize(x.masked_fill(outliers, 0.0)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"
