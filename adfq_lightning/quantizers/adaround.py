"""AdaRound weight quantizer: a per-channel uniform grid with learned up/down rounding."""

from __future__ import annotations

import torch
from torch import nn

from .base import Quantizer
from .uniform import Granularity, Search, UniformQuantizer

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (Nagel et al., 2020)


class AdaRoundQuantizer(Quantizer):
    """Weight quantizer whose rounding direction is a learnable variable per weight.

    The grid (scale, zero point) is searched once from the weight and then frozen. ``alpha`` starts at the
    value that reproduces round-to-nearest, so with hard rounding and no reconstruction this *is* plain
    nearest rounding. During reconstruction (``soft=True``) the rounding is the rectified sigmoid of
    ``alpha``; afterwards it is hard: exactly 0 or 1.
    """

    observes_activations = False

    def __init__(self, bits: int, granularity: Granularity = "channel", search: Search = "mse", percentile: float = 0.9999,
                 p: float = 2.4):
        super().__init__(bits)
        # ``p``: exponent of the error the grid search minimises (2.4 as the reference's search for q/k/v).
        self.grid = UniformQuantizer(bits, granularity=granularity, search=search, percentile=percentile, p=p)
        self.grid.scale.requires_grad_(False)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.soft = False

    def init_from(self, w: torch.Tensor) -> None:
        self.grid.name = self.name
        self.grid.calibrate(w)
        rest = (w / self.grid.scale - torch.floor(w / self.grid.scale)).clamp(1e-4, 1 - 1e-4)
        self.alpha.data = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1).to(self.alpha.dtype)

    def rounding(self) -> torch.Tensor:
        """The rounding offsets in [0, 1]: soft during reconstruction, exactly 0 or 1 otherwise."""
        if self.soft:
            return (torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        return (self.alpha >= 0).to(self.alpha.dtype)

    def regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's term that pushes every soft rounding variable to 0 or 1 as ``beta`` is annealed."""
        return (1 - (2 * self.rounding() - 1).abs().pow(beta)).sum()

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        scale, zp = self.grid.scale, self.grid.zero_point
        w_int = (torch.floor(w / scale) + self.rounding() + zp).clamp(0, self.levels - 1)
        return (w_int - zp) * scale

    def step_sizes(self) -> list[nn.Parameter]:
        return []  # the weight grid stays fixed; only the rounding is learned

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, granularity={self.grid.granularity}, soft={self.soft}"
