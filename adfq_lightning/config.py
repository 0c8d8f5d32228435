"""``ADFQConfig``: the one serialisable recipe, in three sections (quantization scheme, reconstruction,
runtime), plus the baseline presets.

Each section is a dataclass of its own; ``ADFQConfig`` inherits all three, so its constructor, its YAML and its
CLI keys stay flat (``ADFQConfig(iters=1000, w_bits=4)``, ``--model.config.iters``). Why each default is what it
is, with the number that decided it, is in docs/method.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Literal, Optional

from .quantizers import GRAD_MODES, GradMode, check_bits

Method = Literal["adfq", "minmax", "percentile"]


def _default_overrides() -> dict[str, dict[str, int]]:
    # Patch embedding and classifier stay at 8 bits, as in the reference code and most PTQ papers.
    eight = {"w_bits": 8, "a_bits": 8}
    return {"patch_embed.*": dict(eight), "head": dict(eight), "head.*": dict(eight), "head_dist": dict(eight)}


def _check_choices(config: object, choices: dict[str, tuple]) -> None:
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name}={getattr(config, name)!r}: use one of {allowed}.")


@dataclass
class QuantScheme:
    """Which quantizer each tensor gets, at how many bits.

    Args:
        w_bits: weight bits (2-8) of every Linear/Conv, unless ``overrides`` says otherwise.
        a_bits: activation bits (2-8).
        method: ``adfq``, or a per-tensor uniform baseline without reconstruction: ``minmax`` / ``percentile``.
        ppoq: Per-Patch Outlier-aware Quantizer on the qkv and fc1 inputs (else per-tensor uniform).
        qkv_outlier_threshold: |x| above which PPOQ keeps a qkv input in full precision.
        fc1_outlier_threshold: |x| above which PPOQ keeps an fc1 input in full precision.
        slq: Shift-Log2 Quantizer on the fc2 input (else per-tensor uniform).
        slq_base: ``sqrt2`` (reference) or ``2``: the level spacing of SLQ.
        log_softmax: log-sqrt(2) quantizer on the attention probabilities (else per-tensor uniform).
        act_family: ``auto``: each log quantizer takes a uniform grid instead where that has the lower calibration
            error; ``log``: always the log grids.
        qkv_error_p: exponent of the error that the clipping search of the q, k and v grids minimises.
        weight_grid: ``search`` (percentiles and shrunk ranges, L2.4 error) or ``reference`` (three percentiles,
            L2 error): how ADFQ searches the per-channel weight grid.
        percentile: clipping percentile of the ``percentile`` baseline.
        overrides: ``{fnmatch pattern on the module name: {"w_bits": .., "a_bits": ..}}``; the last match wins.
        bit_budget: mixed precision: ``{"w_bits": 3.5, "a_bits": 3.5, "candidates": [3, 4, 6, 8]}`` (the fields of
            :class:`~adfq_lightning.BitBudget`) lets ``quantize()`` allocate the width of every module that
            ``overrides`` does not name, before it calibrates.
    """

    w_bits: int = 4
    a_bits: int = 4
    method: Method = "adfq"
    ppoq: bool = True
    qkv_outlier_threshold: float = 5.0
    fc1_outlier_threshold: float = 5.0
    slq: bool = True
    slq_base: Literal["sqrt2", "2"] = "sqrt2"
    log_softmax: bool = True
    act_family: Literal["auto", "log"] = "auto"
    qkv_error_p: float = 2.4
    weight_grid: Literal["search", "reference"] = "search"
    percentile: float = 0.9999
    overrides: dict[str, dict[str, int]] = field(default_factory=_default_overrides)
    bit_budget: Optional[dict] = None

    def _check_scheme(self) -> None:
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        if self.method not in ("adfq", "minmax", "percentile"):
            raise ValueError(f"method={self.method!r}: use 'adfq', 'minmax' or 'percentile'.")
        for name in ("qkv_outlier_threshold", "fc1_outlier_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive number (the reference uses 5 or 10).")
        if not isinstance(self.qkv_error_p, (int, float)) or not 1.0 <= self.qkv_error_p <= 8.0:
            raise ValueError(f"qkv_error_p={self.qkv_error_p!r} must be a number from 1 to 8 (2.4 as the reference, "
                             "2.0 for the mean squared error).")
        for pattern, bits in self.overrides.items():
            unknown = set(bits) - {"w_bits", "a_bits"}
            if unknown:
                raise ValueError(f"overrides[{pattern!r}] has unknown keys {sorted(unknown)}: use w_bits and a_bits.")
            for key, value in bits.items():
                check_bits(value, f"overrides[{pattern!r}][{key!r}]")
        _check_choices(self, {"weight_grid": ("search", "reference"), "act_family": ("auto", "log")})
        if self.bit_budget is not None:
            from .allocation.budget import BitBudget  # here: the allocation package builds on this module

            if not isinstance(self.bit_budget, dict):
                raise ValueError(f"bit_budget={self.bit_budget!r} must be a mapping such as "
                                 "{'w_bits': 3.5, 'a_bits': 3.5}.")
            try:
                BitBudget(**self.bit_budget)
            except TypeError as err:
                raise ValueError(f"bit_budget={self.bit_budget!r}: {err}; its keys are w_bits, a_bits, "
                                 "candidates.") from None

    def bits_for(self, module_name: str) -> tuple[int, int]:
        """(weight bits, activation bits) of a module, after ``overrides``."""
        w_bits, a_bits = self.w_bits, self.a_bits
        for pattern, bits in self.overrides.items():
            if fnmatchcase(module_name, pattern):
                w_bits, a_bits = bits.get("w_bits", w_bits), bits.get("a_bits", a_bits)
        return w_bits, a_bits


@dataclass
class ReconstructionRecipe:
    """How quantizers are initialised and how ASMO reconstructs each module.

    Args:
        init_samples: calibration images used to initialise activation quantizers.
        reconstruct: run ASMO (module-wise reconstruction) after initialisation.
        iters: reconstruction iterations per module (the paper's 3,000; the CIFAR-10 configs run 1,000).
        batch_size: images per reconstruction iteration.
        rounding_lr: Adam rate of the AdaRound variables; None scales it with the budget, ``3e-3 * 3000 / iters``
            within [3e-3, 0.1].
        scale_lr: Adam rate of the activation step sizes, with cosine decay to 0 over ``iters``.
        rounding_weight: weight of the AdaRound rounding regulariser.
        beta_start: the regulariser's annealed exponent at the end of warm-up.
        beta_end: the regulariser's exponent at the end.
        warmup: fraction of ``iters`` before the regulariser starts.
        attn_kl: add the attention-score KL term for attention modules.
        attn_kl_form: ``keys`` (KL over keys of temperature-softened scores) or ``heads`` (the reference code's).
        kl_temperature: temperature T of the KL term.
        kl_lambda: the KL term enters the loss as ``KL / kl_lambda``.
        qdrop_prob: probability of keeping each element of the quantized-prefix input (QDrop); the rest comes from
            the float prefix. 1.0 disables mixing.
        qdrop_until: fraction of ``iters`` during which QDrop mixes the input (1.0: to the end).
        rec_p: exponent of the Lp output reconstruction loss.
        act_grad: how the loss gradient passes through activation quantizers: ``ste`` straight through,
            ``in_range`` only for values the grid represents, ``none`` not at all (reference code).
        learn_steps: which activation step sizes are learned: ``all``, or ``linear_inputs`` (the inputs of
            Linear/Conv layers, as the reference code).
        harden_at: fraction of ``iters`` after which the rounding is fixed; step sizes learn on after it.
        holdout: fraction of the calibration images kept out of the updates, to measure each module's error on.
        adaptive_iters: ``iters`` becomes a ceiling: once a module's held-out error stops falling during the
            warm-up, the rest of its schedules run whole in fewer iterations (:mod:`adfq_lightning.reconstruction.
            schedule`); the report gives each module's iterations.
        safeguard: a module whose held-out error got worse keeps its pre-reconstruction state.
        bias_correction: empirical bias correction of each module's Linears, kept where it lowers the held-out
            error. None: on for ADFQ, off for the baselines.
        seed: seeds every random choice of reconstruction.
    """

    init_samples: int = 256
    reconstruct: bool = True
    iters: int = 3000
    batch_size: int = 32
    rounding_lr: Optional[float] = None
    scale_lr: float = 4e-5
    rounding_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    attn_kl: bool = True
    attn_kl_form: Literal["keys", "heads"] = "keys"
    kl_temperature: float = 4.0
    kl_lambda: float = 0.1
    qdrop_prob: float = 0.5
    qdrop_until: float = 1.0
    rec_p: float = 2.0
    act_grad: GradMode = "ste"
    learn_steps: Literal["all", "linear_inputs"] = "all"
    harden_at: float = 1.0
    holdout: float = 0.1
    adaptive_iters: bool = False
    safeguard: bool = True
    bias_correction: Optional[bool] = None
    seed: int = 0

    def _check_reconstruction(self) -> None:
        if self.rounding_lr is not None and not (isinstance(self.rounding_lr, (int, float)) and self.rounding_lr > 0):
            raise ValueError(f"rounding_lr={self.rounding_lr!r} must be a positive number, or None to scale it with iters.")
        positive = {"iters": self.iters, "batch_size": self.batch_size, "init_samples": self.init_samples}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if not 0.0 < self.qdrop_prob <= 1.0:
            raise ValueError(f"qdrop_prob={self.qdrop_prob!r} must be in (0, 1].")
        if not 0.0 <= self.qdrop_until <= 1.0:
            raise ValueError(f"qdrop_until={self.qdrop_until!r} must be in [0, 1] (1.0 mixes to the last iteration).")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup={self.warmup!r} must be in [0, 1).")
        if self.kl_temperature <= 0 or self.kl_lambda <= 0:
            raise ValueError("kl_temperature and kl_lambda must be positive.")
        _check_choices(self, {"act_grad": GRAD_MODES, "learn_steps": ("all", "linear_inputs"),
                              "attn_kl_form": ("keys", "heads")})
        if not 0.0 < self.harden_at <= 1.0:
            raise ValueError(f"harden_at={self.harden_at!r} must be in (0, 1] (1.0 hardens the rounding at the end).")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout={self.holdout!r} must be in [0, 1) (0.1 keeps a tenth of the images aside).")

    @property
    def effective_rounding_lr(self) -> float:
        """``rounding_lr``, or the budget-scaled rate when it is None (the same product of rate and iterations
        as the reference's 3e-3 x 3,000)."""
        return self.rounding_lr_for(self.iters)

    def rounding_lr_for(self, iters: float) -> float:
        """``rounding_lr``, or the rate that scales with a budget of ``iters`` iterations when it is None."""
        if self.rounding_lr is not None:
            return float(self.rounding_lr)
        return min(0.1, max(3e-3, 3e-3 * 3000 / iters))


@dataclass
class RuntimeOptions:
    """Where and how calibration runs; no effect on the result beyond floating-point rounding.

    Args:
        cache_device: where the calibration cache lives (``cpu`` or an accelerator); None: the model's device.
        cache_dtype: storage dtype of the cache; ``float16``/``bfloat16`` halve its memory, computation stays
            float32.
        cuda_graphs: on one CUDA device (not under DDP), replay each module's reconstruction forward and backward
            from a CUDA graph. No effect on a CPU.
        torch_compile: compile each reconstruction target's forward and backward with ``torch.compile``, fusing
            its element-wise fake-quant work (not where ``cuda_graphs`` replays the iterations).
    """

    cache_device: Optional[str] = None
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    cuda_graphs: bool = True
    torch_compile: bool = False

    def _check_runtime(self) -> None:
        _check_choices(self, {"cache_dtype": ("float32", "float16", "bfloat16")})


#: Names that moved off the config, with what replaces them.
_MOVED = {
    "weight_quantizer": "adfq_lightning.modules.weight_quantizer(config, module_name)",
    "activation_quantizer": "adfq_lightning.modules.activation_quantizer(config, module_name, role)",
}


@dataclass
class ADFQConfig(RuntimeOptions, ReconstructionRecipe, QuantScheme):
    """How to quantize a ViT and how to reconstruct it: the fields of :class:`QuantScheme`,
    :class:`ReconstructionRecipe` and :class:`RuntimeOptions`, flat (docs/usage.md lists every field)."""

    def __post_init__(self) -> None:
        self._check_scheme()
        self._check_reconstruction()
        self._check_runtime()

    def __getattr__(self, name: str):
        if name in _MOVED:
            raise AttributeError(f"ADFQConfig.{name} moved: use {_MOVED[name]}.")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def corrects_biases(self) -> bool:
        """``bias_correction``, or when it is None: on for ADFQ, off for the baselines."""
        if self.bias_correction is not None:
            return self.bias_correction
        return self.method == "adfq"

    @classmethod
    def preset(cls, name: str, **changes) -> "ADFQConfig":
        """``adfq`` (the method), ``adfq_init`` (ADFQ quantizers, no reconstruction), ``minmax``, ``percentile``."""
        presets = {
            "adfq": {},
            "adfq_init": {"reconstruct": False},
            "minmax": {"method": "minmax", "reconstruct": False},
            "percentile": {"method": "percentile", "reconstruct": False},
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}: choose from {sorted(presets)}.")
        return cls(**{**presets[name], **changes})

    def replace(self, **changes) -> "ADFQConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
