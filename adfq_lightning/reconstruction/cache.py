"""The activation cache: calibration inputs carried forward one residual unit at a time.

Two copies travel along the unit chain: the inputs as the quantized prefix of the model produces them and as
the float prefix does. For the current reconstruction target the cache holds its inputs from both prefixes,
its float outputs and, for an attention, its float scores. The cache lives on ``cache_device`` in
``cache_dtype``; everything computed from it is float32 on the compute device.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ..modules import AttentionScores, recording_scores
from .cuda_graph import TargetCall
from .units import run_until

CHUNK = 64  # samples per forward pass while building the cache

UnitRun = Callable[[torch.Tensor], torch.Tensor]


def batched(x: torch.Tensor) -> Iterator[torch.Tensor]:
    for i in range(0, x.shape[0], CHUNK):
        yield x[i : i + CHUNK]


def per_sample(t: torch.Tensor, n: int) -> torch.Tensor:
    """(n*k, ...) as (n, k, ...): windows of one image stay together."""
    return t.reshape(n, -1, *t.shape[1:])


class ActivationCache:
    """Unit inputs on both prefixes (``x_q``, ``x_fp``) and the current target's tensors.

    Target tensors, per sample: ``t_q``/``t_fp`` its inputs on the quantized/float prefix, ``out_fp`` its float
    output, ``scores_fp`` its float attention scores (None for a target without scores); ``kwargs`` the keyword
    arguments it is called with (a Swin window mask).
    """

    def __init__(self, images: torch.Tensor, device: torch.device, cache_device: torch.device,
                 cache_dtype: torch.dtype) -> None:
        self.device, self.cache_device, self.dtype = device, cache_device, cache_dtype
        # a CPU cache feeding an accelerator is pinned, so its batches copy asynchronously
        self._pin = cache_device.type == "cpu" and device.type == "cuda"
        self.images = self.store(images.float())
        self.unit = -1  # the unit whose inputs x_q/x_fp hold; -1: not built
        self.kwargs: dict = {}
        self.per_sample_norm = 1.0
        self.scores_fp: Optional[torch.Tensor] = None

    def store(self, t: torch.Tensor) -> torch.Tensor:
        """Into the cache: its device and storage dtype (pinned when it feeds an accelerator from the CPU)."""
        t = t.to(self.cache_device, self.dtype)
        return t.pin_memory() if self._pin else t

    def load(self, t: torch.Tensor) -> torch.Tensor:
        """Out of the cache, for computation: the compute device, float32."""
        return t.to(self.device, torch.float32, non_blocking=True)

    @torch.no_grad()
    def run_unit(self, run: UnitRun, x: torch.Tensor) -> torch.Tensor:
        return self.store(torch.cat([run(self.load(b)) for b in batched(x)]))

    def advance_to(self, unit: int, runs: list[UnitRun], quantize_through: Callable[[int], None],
                   float_model: Callable[[], None]) -> None:
        """Carry both prefixes' inputs forward up to ``unit``: unit ``u`` runs once with the stages of units up to ``u``
        quantized (``quantize_through(u)``) and once in float (``float_model()``)."""
        if self.unit < 0 or self.unit > unit:
            self.x_q, self.x_fp, self.unit = self.images, self.images, 0
        while self.unit < unit:
            quantize_through(self.unit)
            self.x_q = self.run_unit(runs[self.unit], self.x_q)
            float_model()
            self.x_fp = self.run_unit(runs[self.unit], self.x_fp)
            self.unit += 1

    def reset(self) -> None:
        """Forget the carried inputs (a resumed state rebuilds them)."""
        self.unit = -1

    @torch.no_grad()
    def capture(self, run: UnitRun, target: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``target``'s per-sample inputs while its unit runs on ``x``, and the keyword arguments it is called with."""
        inputs, kwargs = [], {}
        for b in batched(x):
            args, kwargs = run_until(run, target, self.load(b))
            if len(args) != 1:
                raise RuntimeError(f"{type(target).__name__} is called with {len(args)} positional inputs; "
                                   "reconstruction supports one (pass extras as keyword arguments).")
            inputs.append(per_sample(args[0], b.shape[0]))
        return self.store(torch.cat(inputs)), kwargs

    def forward(self, module: nn.Module, x: torch.Tensor,
                call: Optional[TargetCall] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Target output (and attention scores) for per-sample inputs ``x`` of shape (n, k, ...), run eagerly or
        through ``call`` (a CUDA graph's replay or a compiled call)."""
        n, flat = x.shape[0], self.load(x.flatten(0, 1))
        if call is not None:
            out, scores = call(flat)
        else:
            out = module(flat, **self.kwargs)
            scores = module.scores if isinstance(module, AttentionScores) else None
        return per_sample(out, n), (None if scores is None else per_sample(scores, n))

    @torch.no_grad()
    def record_float_outputs(self, module: nn.Module) -> None:
        """The target's float outputs (and scores) on the float prefix's inputs ``t_fp``."""
        with recording_scores(module):
            outs = [self.forward(module, b) for b in batched(self.t_fp)]
        self.out_fp = self.store(torch.cat([o for o, _ in outs]))
        self.scores_fp = None if outs[0][1] is None else self.store(torch.cat([s for _, s in outs]))
        self.per_sample_norm = self.out_fp[0].numel() / self.out_fp.shape[2]

    def megabytes(self) -> float:
        tensors = (self.x_q, self.x_fp, self.t_q, self.t_fp, self.out_fp,
                   *(() if self.scores_fp is None else (self.scores_fp,)))
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    def release_target(self) -> None:
        del self.t_q, self.t_fp, self.out_fp
        self.scores_fp = None

    def release(self) -> None:
        del self.x_q, self.x_fp
        self.unit = -1
