"""A reconstruction target's forward and backward captured as CUDA graphs.

On a GPU one ASMO iteration is several hundred small kernels (fake quantization, soft rounding, the
attention, their backward). Launched one by one from Python they cost more than they compute, so that
DeiT-S and ViT-B take the same time per iteration. Captured once per phase of a module (soft rounding,
then hard) with ``torch.cuda.make_graphed_callables`` and replayed every iteration, they run at the GPU's
speed; the losses, the rounding regulariser and the optimizer step stay eager, where their schedules live.
"""

from __future__ import annotations

import warnings
from typing import Callable, Hashable, Optional

import torch
from torch import nn

from ..modules import AttentionScores

TargetCall = Callable[[torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]]


class _FixedKeywords(nn.Module):
    """The target as a function of its flattened input alone, returning its attention scores too.

    A graph takes tensors only and hands back only what it returns: the keyword arguments (a Swin window
    mask) are fixed per stage, and the scores the target records would otherwise stay those of the capture.
    """

    def __init__(self, target: nn.Module, kwargs: dict) -> None:
        super().__init__()
        self.target, self.kwargs = target, kwargs
        self.training = target.training

    def forward(self, x: torch.Tensor):
        out = self.target(x, **self.kwargs)
        scores = self.target.scores if isinstance(self.target, AttentionScores) else None
        return out if scores is None else (out, scores)


def graph_target(target: nn.Module, kwargs: dict, sample: torch.Tensor,
                 capture: Callable = torch.cuda.make_graphed_callables) -> TargetCall:
    """Capture ``target(x, **kwargs)`` and its backward for inputs shaped like ``sample``.

    The capture bakes in which parameters require gradients and every Python switch of the quantizers (soft
    or hard rounding, enabled, score recording): capture again when one of them changes. ``capture`` has
    ``make_graphed_callables``'s signature (tests pass one that keeps the module eager, on a CPU).
    """
    for p in target.parameters():
        if p.requires_grad and p.grad is None:
            # an allocated .grad is added to in place; a missing one could be set to the graph's own static
            # gradient buffer, which the next replay overwrites
            p.grad = torch.zeros_like(p)
    graphed = capture(_FixedKeywords(target, kwargs), (sample.detach().clone(),), allow_unused_input=True)

    def call(x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        result = graphed(x)
        return (result[0], result[1]) if isinstance(result, tuple) else (result, None)

    return call


class PhaseGraphs:
    """The current target's graph, captured again whenever the phase (stage, soft or hard rounding) changes.

    A capture that fails (an operation that cannot be captured) warns once and leaves every later call eager:
    the results stay correct, only slower.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._graph: Optional[TargetCall] = None
        self._phase: Optional[Hashable] = None

    def get(self, phase: Hashable, name: str, target: nn.Module, kwargs: dict,
            sample: torch.Tensor) -> Optional[TargetCall]:
        """The graph of ``phase`` for inputs like ``sample`` (None: run eagerly)."""
        if self.enabled and self._phase != phase:
            self.clear()  # free the previous phase's graph memory first
            try:
                self._graph = graph_target(target, kwargs, sample)
            except RuntimeError as error:
                warnings.warn(f"CUDA graph capture of {name} failed ({error}); reconstruction goes on without "
                              "graphs. Set cuda_graphs=False to skip the attempt.", stacklevel=3)
                self.enabled = False
            self._phase = phase
        return self._graph

    def clear(self) -> None:
        self._graph, self._phase = None, None
