"""The method's table: which quantizer each tensor gets, built from an :class:`~adfq_lightning.ADFQConfig`.

A quantized module calls :func:`weight_quantizer` for its weight and :func:`activation_quantizer` for each
activation it quantizes, naming where the activation sits (its ``Role``).
"""

from __future__ import annotations

from typing import Literal

from ..config import ADFQConfig
from ..quantizers import (
    AdaRoundQuantizer,
    BestOfQuantizer,
    LogSqrt2Quantizer,
    PerPatchOutlierQuantizer,
    Quantizer,
    ShiftLog2Quantizer,
    UniformQuantizer,
)

#: Where an activation quantizer sits; decides which quantizer ADFQ puts there.
Role = Literal["qkv_input", "fc1_input", "fc2_input", "proj_input", "q", "k", "v", "attn_probs", "input"]
#: Roles whose quantizer feeds a Linear/Conv: the step sizes the reference code learns.
LINEAR_INPUT_ROLES = ("qkv_input", "fc1_input", "fc2_input", "proj_input", "input")

__all__ = ["LINEAR_INPUT_ROLES", "Role", "activation_quantizer", "weight_quantizer"]


def _baseline_search(config: ADFQConfig) -> str:
    return "minmax" if config.method == "minmax" else "percentile"


def weight_quantizer(config: ADFQConfig, module_name: str) -> AdaRoundQuantizer:
    """The weight quantizer of the Linear/Conv ``module_name``: per output channel for ADFQ, per tensor for the
    baselines, with learned rounding either way."""
    bits = config.bits_for(module_name)[0]
    if config.method == "adfq" and config.weight_grid == "reference":
        q = AdaRoundQuantizer(bits, granularity="channel", search="percentile_mse", p=2.0)
    elif config.method == "adfq":
        q = AdaRoundQuantizer(bits, granularity="channel", search="mse", p=2.4)
    else:
        q = AdaRoundQuantizer(bits, granularity="tensor", search=_baseline_search(config), percentile=config.percentile)
    q.name = f"{module_name}.weight"
    return q


def _log_family(config: ADFQConfig, log: Quantizer) -> Quantizer:
    if config.act_family == "log":
        return log
    return BestOfQuantizer(log, UniformQuantizer(log.bits, search="mse", grad=log.grad))


def activation_quantizer(config: ADFQConfig, module_name: str, role: Role) -> Quantizer:
    """The quantizer for one activation tensor of ``module_name``, chosen by where it sits (the method's table)."""
    bits, grad = config.bits_for(module_name)[1], config.act_grad
    q: Quantizer
    if config.method != "adfq":
        q = UniformQuantizer(bits, search=_baseline_search(config), percentile=config.percentile, grad=grad)
    elif role in ("qkv_input", "fc1_input") and config.ppoq:
        threshold = config.qkv_outlier_threshold if role == "qkv_input" else config.fc1_outlier_threshold
        q = PerPatchOutlierQuantizer(bits, threshold=threshold, grad=grad)
    elif role == "fc2_input" and config.slq:
        q = _log_family(config, ShiftLog2Quantizer(bits, base=config.slq_base, grad=grad))
    elif role == "attn_probs" and config.log_softmax:
        q = _log_family(config, LogSqrt2Quantizer(bits, grad=grad))
    else:
        p = config.qkv_error_p if role in ("q", "k", "v") else 2.0
        q = UniformQuantizer(bits, search="mse", p=p, grad=grad)
    q.name, q.role = f"{module_name}.{role}", role
    return q
