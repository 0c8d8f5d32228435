"""Empirical bias correction (Nagel et al. 2019), applied to a module after its calibration and reconstruction.

Each Linear of the target, in call order, gets the bias that moves its mean output on the quantized prefix
(update images only) to the float model's. The module keeps the corrections only if its held-out error falls.
The correction is stored apart from the float bias (``QuantLinear.bias_correction``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..modules import QuantLinear
from ..quantizers import set_quantization
from .cache import ActivationCache, batched
from .cross_rank import all_reduce_sum


@torch.no_grad()
def correct_biases(cache: ActivationCache, module: nn.Module, update_rows: torch.Tensor, stats: dict,
                   heldout_error: Callable[[], float]) -> None:
    """Correct the biases of ``module``'s Linears; keep them if ``heldout_error()`` falls below
    ``stats["final_error"]`` (recorded in ``stats``)."""
    layers = [m for m in module.modules() if isinstance(m, QuantLinear) and m.correctable]
    if not layers:
        return
    set_quantization(module, False)
    float_means = _output_means(cache, module, layers, cache.t_fp, update_rows)
    set_quantization(module, True)
    for layer, float_mean in zip(layers, float_means):
        quantized_mean = _output_means(cache, module, [layer], cache.t_q, update_rows)[0]
        layer.bias_correction = (float_mean - quantized_mean).to(layer.bias.dtype)
    stats["bias_corrected_error"] = error = heldout_error()
    stats["bias_corrected"] = error < stats["final_error"]
    if stats["bias_corrected"]:
        stats["final_error"] = error
    else:
        for layer in layers:
            layer.bias_correction = None


def _output_means(cache: ActivationCache, module: nn.Module, layers: list[nn.Module], inputs: torch.Tensor,
                  rows: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's output averaged over the update images (all ranks) and tokens while the target runs on
    ``inputs``."""
    sums = [torch.zeros(layer.out_features, dtype=torch.float64, device=cache.device) for layer in layers]
    counts = torch.zeros(len(layers), dtype=torch.float64, device=cache.device)

    def accumulate(i: int):
        def hook(_layer, _args, out):
            flat = out.detach().reshape(-1, out.shape[-1]).double()
            sums[i] += flat.sum(0)
            counts[i] += flat.shape[0]
        return hook

    handles = [layer.register_forward_hook(accumulate(i)) for i, layer in enumerate(layers)]
    try:
        for chunk in batched(rows.to(cache.cache_device)):
            cache.forward(module, inputs[chunk])
    finally:
        for handle in handles:
            handle.remove()
    *totals, counts = all_reduce_sum(torch.cat([*sums, counts])).split([*(len(t) for t in sums), len(layers)])
    return [(total / count).float() for total, count in zip(totals, counts)]
