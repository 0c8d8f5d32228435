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


class _WithScores(nn.Module):
    """The target returning its attention scores too: read inside the compiled code, not as a side effect."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor, **kwargs):
        out = self.target(x, **kwargs)
        return out, (self.target.scores if isinstance(self.target, AttentionScores) else None)


class CompiledTargets:
    """``get(module, kwargs)``: the compiled call of a reconstruction target, or None to run it eagerly."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._compiled: dict[int, nn.Module] = {}

    def get(self, module: nn.Module, kwargs: dict) -> Optional[TargetCall]:
        if not self.enabled:
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

