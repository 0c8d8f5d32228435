"""How much a layer's quantization costs: KL of the model's logits to the float model's on held-out calibration
images, with that layer alone quantized at a candidate width by ADFQ's initialised quantizers (no reconstruction).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

from ..config import ADFQConfig
from ..modules import AttentionScores, QuantConv2d, QuantLinear, QuantMatMul
from ..quantizers import Quantizer, outermost_quantizers, set_quantization


@dataclass
class Unit:
    """One allocated choice: a layer's weights (``kind="w"``) or a module's activation quantizers (``"a"``).

    ``name`` is the module name its ``overrides`` entry takes, ``size`` what one bit of width costs in the budget
    (parameters, or activation elements per image), ``kl[bits]`` its measured cost at each candidate width.
    """

    name: str
    kind: str
    size: int
    kl: dict[int, float] = field(default_factory=dict)


def units_of(model: nn.Module, config: ADFQConfig, image: torch.Tensor) -> list[Unit]:
    """The allocatable units of a converted model: every Linear/Conv's weights and input, every attention's
    matmul inputs, except modules an explicit ``config.overrides`` pattern fixes."""
    elements = _activation_elements(model, image)
    units = []
    for name, m in model.named_modules():
        if any(fnmatchcase(name, pattern) for pattern in config.overrides):
            continue
        if isinstance(m, (QuantLinear, QuantConv2d)):
            units.append(Unit(name, "w", m.weight.numel()))
            units.append(Unit(name, "a", elements[id(m.input_quantizer)]))
        elif isinstance(m, AttentionScores):
            units.append(Unit(name, "a", sum(elements[id(q)] for q in _own_activation_quantizers(m))))
    return units


def _own_activation_quantizers(module: nn.Module) -> list[Quantizer]:
    """An attention's own activation quantizers (q, k, v, probabilities), not those of its Linears."""
    return [q for mm in module.children() if isinstance(mm, QuantMatMul) for q in outermost_quantizers(mm)]


@torch.no_grad()
def _activation_elements(model: nn.Module, image: torch.Tensor) -> dict[int, int]:
    """Elements each activation quantizer sees for one image (quantizers off: the float forward)."""
    counts: dict[int, int] = {}
    hooks = [q.register_forward_pre_hook(lambda q, args: counts.__setitem__(id(q), args[0].numel()))
             for q in model.modules() if isinstance(q, Quantizer) and q.observes_activations]
    set_quantization(model, False)
    try:
        model(image[:1])
    finally:
        for h in hooks:
            h.remove()
    return counts


def _quantizers_of(model: nn.Module, unit: Unit) -> list[Quantizer]:
    module = model.get_submodule(unit.name)
    if unit.kind == "w":
        return [module.weight_quantizer]
    if isinstance(module, (QuantLinear, QuantConv2d)):
        return [module.input_quantizer]
    return _own_activation_quantizers(module)


@torch.no_grad()
def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(reference || logits) over images, of their soft-max distributions."""
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def measure(model: nn.Module, calib: torch.Tensor, held: torch.Tensor, units: list[Unit], candidates: tuple[int, ...],
            config: ADFQConfig) -> None:
    """Fill ``unit.kl`` for every unit and candidate width. ``model`` is the float model (left as it is)."""
    from ..api import quantize

    training = model.training
    with torch.no_grad():
        reference = model.eval()(held)
    model.train(training)  # the float model is left as it was
    for bits in candidates:
        probe = copy.deepcopy(model)
        quantize(probe, calib, config.replace(w_bits=bits, a_bits=bits, reconstruct=False), verbose=False)
        set_quantization(probe, False)
        for unit in units:
            quantizers = _quantizers_of(probe, unit)
            for q in quantizers:
                q.enabled = True
            with torch.no_grad():
                unit.kl[bits] = _kl(reference, probe(held))
            for q in quantizers:
                q.enabled = False
