"""Shared machinery of every fake-quantizer: bit checks, calibration switch, straight-through rounding."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import nn

MIN_BITS, MAX_BITS = 2, 8

#: How the gradient of the loss reaches an activation quantizer's *input* during reconstruction:
#: ``ste`` straight through (uniform grids pass none where they clamp); ``in_range`` straight through only
#: for values the grid represents (none for clipped values, nor for values a log grid flushes to zero);
#: ``none`` no input gradient at all (plain rounding, as the reference code). Step sizes learn in every mode.
GradMode = Literal["ste", "in_range", "none"]
GRAD_MODES = ("ste", "in_range", "none")


def check_bits(bits: int, what: str = "bits") -> int:
    """Reject bit-widths the quantizers do not implement, naming the supported range."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what}={bits!r} is not supported: use an integer from {MIN_BITS} to {MAX_BITS}.")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def quantile(x: torch.Tensor, q: float, dim: int) -> torch.Tensor:
    """Quantile along ``dim`` by ``kthvalue``: ``torch.quantile`` refuses inputs above 16M elements."""
    n = x.shape[dim]
    k = min(max(int(round(q * (n - 1))) + 1, 1), n)
    return x.kthvalue(k, dim=dim).values


class Quantizer(nn.Module):
    """Base fake-quantizer.

    A quantizer is *enabled* (quantizes) or not (identity), and is calibrated from the first tensor it sees
    while :func:`calibrating` is active. Every piece of state lives in parameters or buffers so a quantized
    model saves and reloads through its ``state_dict``. The ``calibrated`` buffer is mirrored in a Python flag
    that ``forward`` reads: a branch on a tensor would be data-dependent control flow for ``torch.export``.
    """

    #: activation quantizers calibrate from data (see :func:`calibrating`); weight quantizers from their weight.
    observes_activations = True

    def __init__(self, bits: int, grad: GradMode = "ste") -> None:
        super().__init__()
        self.bits = check_bits(bits)
        if grad not in GRAD_MODES:
            raise ValueError(f"grad={grad!r}: use one of {GRAD_MODES}.")
        self.grad = grad
        self.enabled = True
        self.name = ""  # set by the owning module, for error messages
        self.role = ""  # where an activation quantizer sits (see adfq_lightning.modules.factory.Role), set with the name
        self._calibrate_next = False
        self._ready = False  # mirrors the ``calibrated`` buffer
        self.register_buffer("calibrated", torch.tensor(False))

    @property
    def levels(self) -> int:
        return 2**self.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self._calibrate_next:
            self._calibrate_next = False
            self.calibrate(x)
        if not self._ready:
            raise RuntimeError(
                f"Quantizer {self.name or type(self).__name__} is not calibrated: run adfq_lightning.quantize() "
                "(or the ADFQ callback) on calibration data, or load a quantized checkpoint, before using it."
            )
        return self.fake_quantize(x)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Set the quantization parameters from an observed tensor."""
        if x.numel() == 0:
            raise ValueError(f"Quantizer {self.name or type(self).__name__} received an empty calibration tensor.")
        if not torch.isfinite(x).all():
            raise ValueError(
                f"Quantizer {self.name or type(self).__name__} received NaN or Inf values during calibration: "
                "check the calibration images and the model weights (a NaN/Inf weight propagates to activations)."
            )
        self.init_from(x.detach().float())
        self.calibrated.fill_(True)
        self._ready = True

    def init_from(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def step_sizes(self) -> list[nn.Parameter]:
        """Parameters that reconstruction may learn (activation step sizes)."""
        return [p for p in self.parameters(recurse=False)]

    def candidate_step_sizes(self) -> list[nn.Parameter]:
        """Every parameter :meth:`step_sizes` may return once calibrated (what an optimizer built before
        calibration must hold)."""
        return self.step_sizes()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Scales are shaped at calibration (per token, per channel); take the saved shape on reload.
        for name, tensor in [*self._parameters.items(), *self._buffers.items()]:
            saved = state_dict.get(prefix + name)
            if tensor is not None and saved is not None and saved.shape != tensor.shape:
                tensor.data = tensor.data.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.calibrated)


def set_quantization(module: nn.Module, enabled: bool) -> None:
    """Switch every quantizer in ``module`` on (quantized behaviour) or off (exact float behaviour)."""
    for q in module.modules():
        if isinstance(q, Quantizer):
            q.enabled = enabled


def outermost_quantizers(module: nn.Module) -> list["Quantizer"]:
    """The quantizers of ``module`` that are not parts of another quantizer (the grid inside AdaRound, the two
    candidates inside a family choice): each speaks for the quantizers it holds."""
    quantizers = [m for m in module.modules() if isinstance(m, Quantizer)]
    nested = {id(m) for q in quantizers for m in q.modules() if m is not q}
    return [q for q in quantizers if id(q) not in nested]


def activation_quantizers(module: nn.Module) -> list["Quantizer"]:
    """The quantizers of activations (not weight quantizers, nor the parts of another quantizer)."""
    return [q for q in outermost_quantizers(module) if q.observes_activations]


@contextmanager
def calibrating(module: nn.Module) -> Iterator[None]:
    """Within this context every enabled quantizer in ``module`` calibrates on the first tensor it sees.

    Calibration is sequential: a quantizer sees the already-quantized output of the quantizers before it.
    """
    quantizers = outermost_quantizers(module)
    quantizers = [q for q in quantizers if q.enabled and q.observes_activations]
    for q in quantizers:
        q._calibrate_next = True
    try:
        yield
    finally:
        for q in quantizers:
            q._calibrate_next = False
