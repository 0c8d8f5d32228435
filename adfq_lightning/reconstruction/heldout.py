"""The held-out images and the safeguard.

A fraction of the calibration images (``config.holdout``) never enters an update: each module's output error
is measured on them before and after its reconstruction, and with ``config.safeguard`` a module whose
held-out error got worse is put back to its pre-reconstruction state.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import ActivationCache, batched
from .cross_rank import all_reduce_sum
from .losses import output_loss


def holdout_split(num_samples: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out ids, update ids) of the global calibration set, identical on every rank.

    With too few images to keep any aside, both are every image (the errors are then in-sample).
    """
    held = min(int(round(fraction * num_samples)), num_samples - 1)
    if held <= 0:
        everything = torch.arange(num_samples)
        return everything, everything
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + 7919))
    return order[:held].sort().values, order[held:].sort().values


@torch.no_grad()
def output_error(cache: ActivationCache, module: nn.Module, rows: torch.Tensor, num_ids: int, p: float) -> float:
    """Global mean output error (no QDrop) of the target over ``num_ids`` global images, of which this rank holds
    the cache ``rows``."""
    total = torch.zeros((), dtype=torch.float64, device=cache.device)
    for chunk in batched(rows.to(cache.cache_device)):
        out, _ = cache.forward(module, cache.t_q[chunk])
        total += output_loss(out, cache.load(cache.out_fp[chunk]), p, cache.per_sample_norm, 1).double()
    return float(all_reduce_sum(total)) / num_ids


def apply_safeguard(stats: dict, module: nn.Module, initial_state: dict[str, torch.Tensor], error: float,
                    enabled: bool) -> None:
    """Record the reconstructed error and, when it is worse than before reconstruction (and the safeguard is
    ``enabled``), restore the module's learnable quantizer parameters from ``initial_state``."""
    stats["reconstructed_error"] = error
    stats["reverted"] = enabled and error > stats["init_error"]
    if stats["reverted"]:  # worse on images it never saw: keep nearest rounding and initial steps
        with torch.no_grad():
            for name, value in initial_state.items():
                module.get_parameter(name).copy_(value)
        error = stats["init_error"]
    stats["final_error"] = error
