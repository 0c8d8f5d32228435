"""Uniform affine quantizer: per tensor, per output channel (weights) or per token."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .base import GradMode, Quantizer, round_ste

Granularity = Literal["tensor", "channel", "token"]
Search = Literal["mse", "minmax", "percentile", "percentile_mse"]
SEARCHES = ("mse", "minmax", "percentile", "percentile_mse")

#: Clipping candidates tried by the ``mse`` search: percentiles of each group, then shrunk min/max ranges.
MSE_PERCENTILES = (0.99, 0.999, 0.9999, 0.99999, 1.0)
MSE_SHRINK = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
#: Candidates of ``percentile_mse``, the reference code's weight search (best of three percentiles).
REFERENCE_PERCENTILES = (0.999, 0.9999, 0.99999)


def order_statistics(g: torch.Tensor, positions: set[int]) -> dict[int, torch.Tensor]:
    """The values at ``positions`` of each row of ``g`` sorted ascending (what ``kthvalue`` returns), taken from the
    two tails with ``topk``: percentile candidates only read the tails, and this is several times faster than a
    sort of the whole row."""
    n = g.shape[1]
    k_lo = max((p + 1 for p in positions if p < n // 2), default=0)
    k_hi = max((n - p for p in positions if p >= n // 2), default=0)
    if k_lo + k_hi >= n:
        ordered = g.sort(dim=1).values
        return {p: ordered[:, p] for p in positions}
    low = g.topk(k_lo, dim=1, largest=False).values if k_lo else None
    high = g.topk(k_hi, dim=1).values if k_hi else None
    return {p: low[:, p] if p < n // 2 else high[:, n - 1 - p] for p in positions}


class UniformQuantizer(Quantizer):
    """Asymmetric uniform quantizer with a learnable step size (LSQ-style straight-through gradient).

    ``granularity`` picks the groups that share a scale: the whole tensor, each output channel (dim 0 of a
    weight) or each token position (dim -2 of an ``(..., tokens, channels)`` activation). ``search`` picks
    the clipping range: min/max, a fixed percentile, or the candidate with the lowest Lp error (``mse``:
    percentiles and shrunk min/max; ``percentile_mse``: three percentiles), every group searched at once.
    """

    def __init__(
        self,
        bits: int,
        granularity: Granularity = "tensor",
        search: Search = "mse",
        percentile: float = 0.9999,
        p: float = 2.0,
        grad: GradMode = "ste",
    ) -> None:
        super().__init__(bits, grad)
        if granularity not in ("tensor", "channel", "token"):
            raise ValueError(f"granularity={granularity!r}: use 'tensor', 'channel' or 'token'.")
        if search not in SEARCHES:
            raise ValueError(f"search={search!r}: use one of {SEARCHES}.")
        if not 0.5 < percentile <= 1.0:
            raise ValueError(f"percentile={percentile!r} must be in (0.5, 1].")
        self.granularity = granularity
        self.search = search
        self.percentile = percentile
        self.p = p
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))

    # -- grouping ---------------------------------------------------------------------------------------------
    def _groups(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``x`` as ``(groups, elements)`` and the broadcastable shape of one parameter per group."""
        if self.granularity == "tensor":
            return x.reshape(1, -1), ()
        if self.granularity == "channel":
            return x.reshape(x.shape[0], -1), (x.shape[0],) + (1,) * (x.dim() - 1)
        if x.dim() < 2:
            raise ValueError(f"{self.name}: per-token quantization needs (..., tokens, channels), got {tuple(x.shape)}.")
        return x.movedim(-2, 0).reshape(x.shape[-2], -1), (x.shape[-2], 1)

    # -- calibration ------------------------------------------------------------------------------------------
    def _qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # keep 0 exactly representable
        scale = ((hi - lo) / (self.levels - 1)).clamp(min=1e-8)
        zero_point = (-lo / scale).round().clamp(0, self.levels - 1)
        return scale, zero_point

    def _group_error(self, g: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        """Mean Lp error of quantizing each group (in place on one buffer: the search is memory-bound)."""
        q = g / scale[:, None]
        q.round_().add_(zp[:, None]).clamp_(0, self.levels - 1).sub_(zp[:, None]).mul_(scale[:, None])
        return q.sub_(g).abs_().pow_(self.p).mean(dim=1)

    def _candidates(self, g: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        lo, hi = g.amin(dim=1), g.amax(dim=1)
        if self.search == "minmax":
            return [(lo, hi)]
        qs = {"percentile": (self.percentile,), "percentile_mse": REFERENCE_PERCENTILES}.get(self.search,
                                                                                        MSE_PERCENTILES)
        n = g.shape[1]
        at = lambda p: min(max(int(round(p * (n - 1))), 0), n - 1)  # noqa: E731 (as base.quantile)
        value = order_statistics(g, {at(p) for q in qs for p in (q, 1 - q)})
        bounds = [(value[at(1 - q)], value[at(q)]) for q in qs]
        return bounds if self.search != "mse" else bounds + [(lo * a, hi * a) for a in MSE_SHRINK]

    def init_from(self, x: torch.Tensor) -> None:
        g, shape = self._groups(x)
        best_err, best = None, None
        for lo, hi in self._candidates(g):
            scale, zp = self._qparams(lo, hi)
            err = self._group_error(g, scale, zp)
            if best is None:
                best_err, best = err, (scale, zp)
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = (torch.where(better, scale, best[0]), torch.where(better, zp, best[1]))
        self.scale.data = best[0].reshape(shape).to(self.scale.dtype)
        self.zero_point.data = best[1].reshape(shape).to(self.zero_point.dtype)

    # -- forward ----------------------------------------------------------------------------------------------
    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "token" and x.shape[-2] != self.scale.shape[0]:
            raise ValueError(
                f"{self.name}: calibrated for {self.scale.shape[0]} tokens but got {x.shape[-2]}; per-token "
                "scales are static, so calibrate at the image size you run at."
            )
        scale = self.scale.abs().clamp(min=1e-8)
        # x * (1 / scale), as torch.fake_quantize_* and ONNX runtimes compute it: the exported model rounds the
        # same values the same way. ``ste`` and ``in_range`` agree here: clamp passes no gradient outside the grid.
        scaled = x * scale.reciprocal()
        codes = scaled.round().detach() if self.grad == "none" else round_ste(scaled)
        q = (codes + self.zero_point).clamp(0, self.levels - 1)
        return (q - self.zero_point) * scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, granularity={self.granularity}, search={self.search}"
