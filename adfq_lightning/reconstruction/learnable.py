"""What reconstruction learns (AdaRound variables and activation step sizes), its optimizer, and hardening."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import ADFQConfig
from ..modules.factory import LINEAR_INPUT_ROLES
from ..quantizers import AdaRoundQuantizer, outermost_quantizers

#: Indices of the rounding and step-size groups in the optimizer of :func:`make_optimizer` (the step sizes' rate
#: follows a cosine).
ROUNDING_GROUP, STEP_SIZE_GROUP = 0, 1


def learnable_parameters(module: nn.Module, learn_steps: str = "all",
                         candidates: bool = False) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(AdaRound variables, activation step sizes) inside ``module``.

    A quantizer's ``step_sizes()`` speaks for the quantizers nested inside it: the weight grid inside an
    AdaRound quantizer is a UniformQuantizer too, but it is frozen (AdaRound returns no step sizes).
    ``learn_steps="linear_inputs"`` keeps only the step sizes of quantizers that feed a Linear/Conv;
    ``candidates`` includes the step sizes of grids a quantizer may still choose at calibration.
    """
    rounding = [q.alpha for q in adaround_quantizers(module)]
    steps = [p for q in outermost_quantizers(module) if learn_steps == "all" or q.role in LINEAR_INPUT_ROLES
             for p in (q.candidate_step_sizes() if candidates else q.step_sizes())]
    return rounding, steps


def adaround_quantizers(module: nn.Module) -> list[AdaRoundQuantizer]:
    return [q for q in module.modules() if isinstance(q, AdaRoundQuantizer)]


def make_optimizer(model: nn.Module, config: ADFQConfig) -> torch.optim.Optimizer:
    """One Adam over every AdaRound variable (group 0, ``rounding_lr``) and every learnable step size (group 1,
    ``scale_lr``), built once: only the active stage's variables get gradients, and one ``step()`` is one
    reconstruction iteration."""
    rounding, steps = learnable_parameters(model, config.learn_steps, candidates=True)
    return torch.optim.Adam([{"params": rounding, "lr": config.effective_rounding_lr},
                             {"params": steps, "lr": config.scale_lr}])


def quantizer_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the learnable quantizer parameters of ``module`` (what reconstruction changes)."""
    rounding, steps = learnable_parameters(module)
    learnable = {id(p) for p in rounding + steps}
    return {n: p.detach().clone() for n, p in module.named_parameters() if id(p) in learnable}


def undecided_fraction(module: nn.Module) -> float:
    """Share of AdaRound variables whose soft rounding is still strictly between 0 and 1."""
    values = [q.rounding() for q in adaround_quantizers(module)]
    total = sum(v.numel() for v in values)
    return float(sum(((v > 0) & (v < 1)).sum() for v in values)) / total if total else 0.0


def harden(module: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Optional[float]:
    """Fix every rounding variable of ``module`` at its hard decision and stop learning it.

    Returns the share that was still undecided, or None when the rounding was already hard."""
    quantizers = adaround_quantizers(module)
    undecided = undecided_fraction(module) if any(q.soft for q in quantizers) else None
    for q in quantizers:
        q.soft = False
        q.alpha.requires_grad_(False)
        q.alpha.grad = None  # else Adam keeps stepping it with zero gradients
        if optimizer is not None:
            optimizer.state.pop(q.alpha, None)
    return undecided


def freeze(params: list[nn.Parameter], optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Stop learning ``params`` and free their optimizer state."""
    for p in params:
        p.requires_grad_(False)
        p.grad = None  # else Adam keeps stepping it with zero gradients and rebuilds the state popped here
        if optimizer is not None:
            optimizer.state.pop(p, None)
