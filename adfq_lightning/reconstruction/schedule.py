"""Where a module's reconstruction is in its schedule, and the adaptive budget.

The schedules (the rounding regulariser's warm-up and β annealing, hardening, the step-size cosine, QDrop) are
functions of a position from 0 to ``iters``. With a fixed budget one iteration moves it by one. With
``ADFQConfig.adaptive_iters`` the held-out error is measured every ``CHECK_EVERY`` of the budget during the
warm-up; once it falls by less than ``PLATEAU`` between two checks, the rest of the schedule runs whole but
faster, in ``SHORT`` of the budget scaled by the part left, so a module stops early only with every schedule
finished.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

#: fraction of ``iters`` between two held-out error checks during the warm-up
CHECK_EVERY = 0.05
#: a relative fall of the held-out error between two checks below this: it has stopped falling
PLATEAU = 0.05
#: the rest of the schedule then takes this fraction of ``iters``, times the fraction of the schedule left
SHORT = 0.2


@dataclass
class StageBudget:
    """One module's budget: ``iters`` positions of schedule, compressed after iteration ``switch`` (if any) so
    that the schedule ends at iteration ``end``."""

    iters: int
    switch: Optional[int] = None
    end: Optional[int] = None
    last_error: Optional[float] = None

    def __post_init__(self) -> None:
        if self.end is None:
            self.end = self.iters

    def position(self, iteration: int) -> float:
        """The schedule position after ``iteration`` iterations (exactly ``iteration`` with no switch)."""
        if self.switch is None or iteration <= self.switch:
            return iteration
        return self.switch + (iteration - self.switch) * (self.iters - self.switch) / (self.end - self.switch)

    @property
    def rate(self) -> float:
        """Schedule positions per iteration now: 1, or more once the rest is compressed."""
        return 1.0 if self.switch is None else (self.iters - self.switch) / (self.end - self.switch)

    def crossed(self, iteration: int, point: float) -> bool:
        """Whether the schedule reaches ``point`` at this iteration (and had not at the one before)."""
        return self.position(iteration) >= point and (iteration == 0 or self.position(iteration - 1) < point)

    def check_due(self, iteration: int, warmup_end: float) -> bool:
        """Whether the adaptive budget measures the held-out error before this iteration."""
        every = max(1, round(CHECK_EVERY * self.iters))
        return self.switch is None and 0 < iteration < warmup_end and iteration % every == 0

    def observe(self, iteration: int, error: float) -> None:
        """Note the held-out error after ``iteration`` iterations; at a plateau, compress the rest."""
        last, self.last_error = self.last_error, error
        if last is None or last <= 0 or (last - error) / last >= PLATEAU:
            return
        left = 1.0 - iteration / self.iters
        self.switch, self.end = iteration, iteration + max(1, math.ceil(left * SHORT * self.iters))
        self.end = min(self.end, self.iters)

    def state_dict(self) -> dict:
        return {"switch": self.switch, "end": self.end, "last_error": self.last_error}
