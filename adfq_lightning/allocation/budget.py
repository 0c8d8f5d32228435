"""``BitBudget``: the average width a user asks for, and the candidate widths the layers may take."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..quantizers import check_bits


@dataclass(frozen=True)
class BitBudget:
    """The average nominal width of the allocated layers.

    Args:
        w_bits: weight bits averaged over the allocated Linear/Conv layers, weighted by their parameter counts;
            None leaves the weights free (each takes the width that costs least).
        a_bits: activation bits averaged over the allocated activation quantizers, weighted by the elements of
            the tensors they quantize per image; None leaves them free.
        candidates: the widths a layer may take (2-8 bits).
    """

    w_bits: Optional[float] = None
    a_bits: Optional[float] = None
    candidates: tuple[int, ...] = field(default=(3, 4, 6, 8))

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("BitBudget.candidates is empty: give the widths layers may take, e.g. (3, 4, 6, 8).")
        for bits in self.candidates:
            check_bits(bits, "a candidate width")
        object.__setattr__(self, "candidates", tuple(sorted(set(int(b) for b in self.candidates))))
        low, high = self.candidates[0], self.candidates[-1]
        for name in ("w_bits", "a_bits"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"BitBudget({name}={value!r}) must be a number from the narrowest to the widest "
                                 f"candidate ({low} to {high}): widen the candidates or change the budget.")
