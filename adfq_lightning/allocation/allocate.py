"""``allocate_bits``: the widths of every layer under a :class:`BitBudget`, as ``ADFQConfig.overrides``."""

from __future__ import annotations

import copy
import time
from typing import Optional, Union

import torch
from torch import nn

from ..config import ADFQConfig
from ..data.calibration import CalibData, collect_images
from ..reconstruction.heldout import holdout_split
from .budget import BitBudget
from .sensitivity import measure, units_of
from .solver import choose_widths

#: images on which each layer's cost is measured (held out of the calibration that initialises the quantizers)
MAX_SENSITIVITY_IMAGES = 64
#: images that initialise the quantizers of each candidate width for that measurement
MAX_INIT_IMAGES = 128


def allocate_bits(model: nn.Module, calib_data: CalibData, budget: BitBudget, config: Optional[ADFQConfig] = None,
                  *, num_calib: Optional[int] = None, report: bool = False
                  ) -> Union[dict[str, dict[str, int]], tuple[dict[str, dict[str, int]], dict]]:
    """The width of every allocated layer's weights and activations that costs least while the averages stay within
    ``budget``, as ``{module name: {"w_bits": .., "a_bits": ..}}`` (attention modules: ``a_bits`` of their q, k, v
    and probabilities).

    Modules that ``config.overrides`` names (by default the patch embedding and the head, at 8 bits) keep their
    widths and are outside the budget; every other quantized module is allocated. The float ``model`` is left as it
    is. Quantize with ``config.replace(overrides={**config.overrides, **allocated})``.

    Cost of a layer at a width: KL of the logits to the float model's on held-out calibration images with that layer
    alone quantized (ADFQ's quantizers, initialised on the other images). The choice is exact for the sum of these
    costs (an integer program, :func:`~adfq_lightning.allocation.choose_widths`).

    With ``report=True`` it returns ``(overrides, report)``: the budget, the averages reached, every layer's
    chosen width and measured costs, and the seconds it took (what ``adfq_report.json`` keeps under
    ``allocation``).
    """
    started = time.perf_counter()
    if not isinstance(budget, BitBudget):
        raise TypeError(f"budget must be a BitBudget, e.g. BitBudget(w_bits=3.5, a_bits=3.5), not {type(budget).__name__}.")
    config = config or ADFQConfig()
    images = collect_images(calib_data, limit=num_calib)
    if len(images) < 2:
        raise ValueError("allocate_bits needs at least 2 calibration images: some calibrate, some measure the cost.")
    held_ids, calib_ids = holdout_split(len(images), 0.25, config.seed)
    held = images[held_ids[:MAX_SENSITIVITY_IMAGES]]
    pick = torch.randperm(len(calib_ids), generator=torch.Generator().manual_seed(config.seed))[:MAX_INIT_IMAGES]
    init = images[calib_ids[pick.sort().values]]
    units = units_of(_converted_copy(model, config), config, images[:1])
    if not units:
        raise ValueError("no layer is left to allocate: config.overrides fixes every quantized module.")
    measure(model, init, held, units, budget.candidates, config)
    widths = budget.candidates
    groups = [0 if u.kind == "w" else 1 for u in units]
    totals = [sum(u.size for u in units if u.kind == kind) for kind in ("w", "a")]
    capacity = [None if bits is None else bits * total for bits, total in zip((budget.w_bits, budget.a_bits), totals)]
    chosen = choose_widths([[u.kl[b] for b in widths] for u in units], [[u.size * b for b in widths] for u in units],
                           groups, capacity)
    overrides: dict[str, dict[str, int]] = {}
    for unit, k in zip(units, chosen):
        overrides.setdefault(unit.name, {})[f"{unit.kind}_bits"] = widths[k]
    if not report:
        return overrides
    reached = {f"{kind}_bits": (sum(u.size * widths[k] for u, k in zip(units, chosen) if u.kind == kind) / total
                                if total else None) for kind, total in zip(("w", "a"), totals)}
    return overrides, {
        "budget": {"w_bits": budget.w_bits, "a_bits": budget.a_bits, "candidates": list(widths)},
        "reached": reached,
        "layers": [{"name": u.name, "kind": "weights" if u.kind == "w" else "activations", "size": u.size,
                    "bits": widths[k], "kl": {str(b): u.kl[b] for b in widths}} for u, k in zip(units, chosen)],
        "seconds": time.perf_counter() - started,
    }


def _converted_copy(model: nn.Module, config: ADFQConfig) -> nn.Module:
    from ..api import prepare

    return prepare(copy.deepcopy(model).eval(), config)

