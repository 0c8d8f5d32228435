"""Reconstruction targets compiled with ``torch.compile`` (Inductor), so that the several hundred small
element-wise operations of a fake-quantized forward and backward run as a few fused kernels.

One compiled wrapper per target module. Modules of equal structure and shapes share Inductor's compiled code
(Dynamo guards on the code and the shapes, not on the module instance), so only the first block of a kind and
the first hard-rounding iteration pay a compilation. A compilation that fails warns once and leaves every later
iteration eager: the result stays correct, only slower.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ..modules import AttentionScores
from .cuda_graph import TargetCall

#: ``torch_compile=None`` compiles attention targets on a CPU from this many iterations per module on: below it,
#: the compilation (about half a minute the first time, on 2 cores) costs more than the fused iterations save.
AUTO_MIN_ITERS = 500


def compiles(setting: bool | None, device: torch.device, iters: int, graphs: bool) -> bool:
    """Whether reconstruction compiles its targets: ``setting`` when given; else on a CPU from
    :data:`AUTO_MIN_ITERS` iterations per module (on CUDA the graphs of :mod:`.cuda_graph` are used instead)."""
    if setting is not None:
        return setting and not graphs
    return device.type == "cpu" and iters >= AUTO_MIN_ITERS


class _WithScores(nn.Module):
    """The target returning its attention scores too: read inside the compiled code, not as a side effect."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor, **kwargs):
        out = self.target(x, **kwargs)
        return out, (self.target.scores if isinstance(self.target, AttentionScores) else None)


class CompiledTargets:
    """``get(module, kwargs)``: the compiled call of a reconstruction target, or None to run it eagerly.

    Chosen automatically, only attention targets are compiled: there the fused soft-max, log and rounding
    kernels pay; an MLP's time is its matmuls.
    """

    def __init__(self, enabled: bool, attention_only: bool) -> None:
        self.enabled, self.attention_only = enabled, attention_only
        self._compiled: dict[int, nn.Module] = {}

    def get(self, module: nn.Module, kwargs: dict) -> Optional[TargetCall]:
        if not self.enabled or (self.attention_only and not isinstance(module, AttentionScores)):
            return None
        compiled = self._compiled.get(id(module))
        if compiled is None:
            compiled = self._compiled[id(module)] = torch.compile(_WithScores(module), dynamic=False)
        return lambda x: compiled(x, **kwargs)

    def failed(self, name: str, error: Exception) -> None:
        """Give up compiling after ``error`` (warned once); every later call runs eagerly."""
        warnings.warn(f"torch.compile of {name} failed ({type(error).__name__}: {error}); reconstruction goes on "
                      "without compilation. Set torch_compile=False to skip the attempt.", stacklevel=3)
        self.enabled = False
        self._compiled.clear()

    def clear(self) -> None:
        self._compiled.clear()
