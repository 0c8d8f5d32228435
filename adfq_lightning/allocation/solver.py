"""The exact choice of widths under the budget: a multiple-choice knapsack with up to two capacities (weights and
activations), solved as an integer program by HiGHS (``scipy.optimize.milp``)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def choose_widths(cost: Sequence[Sequence[float]], size: Sequence[Sequence[float]], group: Sequence[int],
                  capacity: Sequence[Optional[float]]) -> list[int]:
    """For each item the index of the option to take, minimising the summed ``cost`` subject to, for every group
    ``g`` with a ``capacity[g]``: the summed ``size`` of its items' options is at most ``capacity[g]``.

    ``cost[i][k]`` and ``size[i][k]`` belong to option ``k`` of item ``i``; ``group[i]`` is the budget item ``i``
    counts against. Exact for this additive model (an optimal solution of the integer program; ties broken by
    the solver deterministically). Raises ``ValueError`` when no choice fits.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp  # here: importing the package stays light

    offsets = np.cumsum([0] + [len(c) for c in cost])
    n = int(offsets[-1])
    c = np.concatenate([np.asarray(row, dtype=float) for row in cost])
    one_each = np.zeros((len(cost), n))
    for i in range(len(cost)):
        one_each[i, offsets[i]:offsets[i + 1]] = 1
    constraints = [LinearConstraint(one_each, 1, 1)]
    for g, cap in enumerate(capacity):
        if cap is None:
            continue
        row = np.zeros(n)
        for i, sizes in enumerate(size):
            if group[i] == g:
                row[offsets[i]:offsets[i + 1]] = sizes
        constraints.append(LinearConstraint(row[None, :], -np.inf, cap))
    result = milp(c, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1))
    if not result.success:
        raise ValueError(f"no choice of widths fits the budget ({result.message}).")
    x = np.round(result.x).astype(int)
    chosen = [int(np.argmax(x[offsets[i]:offsets[i + 1]])) for i in range(len(cost))]
    for g, cap in enumerate(capacity):  # the solver's tolerance must not let a budget be exceeded
        if cap is not None and sum(size[i][k] for i, k in enumerate(chosen) if group[i] == g) > cap:
            raise ValueError("the solver's choice exceeds the budget by its tolerance: lower the budget slightly.")
    return chosen
