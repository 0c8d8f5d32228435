"""``ADFQConfig``: every knob of the method in one serialisable dataclass, plus the baseline presets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Literal, Optional

from .quantizers import (
    GRAD_MODES,
    AdaRoundQuantizer,
    BestOfQuantizer,
    GradMode,
    LogSqrt2Quantizer,
    PerPatchOutlierQuantizer,
    Quantizer,
    ShiftLog2Quantizer,
    UniformQuantizer,
    check_bits,
)

Method = Literal["adfq", "minmax", "percentile"]
#: Where an activation quantizer sits; decides which quantizer ADFQ puts there.
Role = Literal["qkv_input", "fc1_input", "fc2_input", "proj_input", "q", "k", "v", "attn_probs", "input"]
#: Roles whose quantizer feeds a Linear/Conv: the step sizes the reference code learns.
LINEAR_INPUT_ROLES = ("qkv_input", "fc1_input", "fc2_input", "proj_input", "input")


def _default_overrides() -> dict[str, dict[str, int]]:
    # Patch embedding and classifier stay at 8 bits, as in the reference code and most PTQ papers.
    eight = {"w_bits": 8, "a_bits": 8}
    return {"patch_embed.*": dict(eight), "head": dict(eight), "head.*": dict(eight), "head_dist": dict(eight)}


@dataclass
class ADFQConfig:
    """How to quantize a ViT and how to reconstruct it.

    Args:
        w_bits: weight bits (2-8), every Linear/Conv unless ``overrides`` says otherwise.
        a_bits: activation bits (2-8).
        method: ``adfq``; or a baseline: ``minmax`` / ``percentile`` (per-tensor uniform for every tensor,
            no reconstruction).
        ppoq: Per-Patch Outlier-aware Quantizer on the qkv and fc1 inputs (else per-tensor uniform).
        qkv_outlier_threshold / fc1_outlier_threshold: |x| above which PPOQ keeps full precision.
        slq: Shift-Log2 Quantizer on the fc2 input (else per-tensor uniform).
        slq_base: ``sqrt2`` (reference) or ``2`` levels for SLQ.
        log_softmax: log-sqrt(2) quantizer on the attention probabilities (else per-tensor uniform).
        act_family: ``auto``: each of those log quantizers takes a uniform grid instead when that has the lower
            calibration error (it does at 6-8 bits, where the log grid's constant relative step is coarse);
            ``log``: always the log grids.
        qkv_error_p: exponent of the error the clipping search of the q, k and v grids minimises. The reference
            code's 2.4 keeps more of their range than the squared error (2.0) does, which clips the few large
            keys that decide where a query attends (``bench/results/quantizer_split_deit_cifar_w6.md``).
        percentile: clipping percentile of the ``percentile`` baseline.
        overrides: ``{fnmatch pattern on the module name: {"w_bits": .., "a_bits": ..}}``; the last match wins.
        init_samples: calibration images used to initialise activation quantizers.
        reconstruct: run ASMO (module-wise reconstruction) after initialisation.
        iters / batch_size: reconstruction iterations per module and images per iteration. ``iters`` is the
            paper's 3,000 by default; the shipped CIFAR-10 W4A4 configs run 1,000, which reach 90 % of its gain
            over no reconstruction in a third of the time (docs/benchmark.md, "The default budget against the paper's").
        rounding_lr / scale_lr: Adam learning rates of the AdaRound variables and of activation step sizes
            (the latter with cosine decay to 0 over ``iters``). ``rounding_lr=None`` scales with the budget:
            ``3e-3 * 3000 / iters`` within [3e-3, 0.1], the reference's 3e-3 at its 3,000 iterations. At 100-200
            iterations the reference's rate leaves most rounding variables undecided, and the final hard rounding
            is a jump (``bench/results/asmo_study*.md``). ``scale_lr`` stays the reference's 4e-5 at any budget;
            the shipped DeiT and Swin CIFAR-10 W4A4 configs set 1.2e-4 at their 1,000 iterations, so that step
            sizes move as far as in 3,000 (not on ViT, where it did not help; nor at 100-200 iterations, where the
            rate scaled the same way moved no Top-1 past the noise, and at 100 raised every module's error;
            docs/benchmark.md).
        rounding_weight / beta_start / beta_end / warmup: AdaRound regulariser weight, annealed exponent and
            the fraction of iterations before the regulariser starts.
        attn_kl: add the attention-score KL term for attention modules.
        kl_temperature / kl_lambda: temperature T; the term enters the loss as ``KL / kl_lambda``.
        qdrop_prob: probability of keeping each element of the quantized-prefix input (QDrop); the rest comes
            from the full-precision prefix. 1.0 disables mixing.
        qdrop_until: fraction of ``iters`` during which QDrop mixes the input; the later iterations, where the
            AdaRound regulariser settles the rounding, see the quantized prefix only. 1.0 mixes to the end. At 200
            iterations stopping half-way does as well as no QDrop on DeiT, but costs Swin most of QDrop's gain
            (docs/benchmark.md).
        rec_p: exponent of the Lp output reconstruction loss.
        act_grad: how the loss gradient passes through activation quantizers to their inputs: ``ste`` straight
            through, ``in_range`` only for values the grid represents, ``none`` not at all (reference code).
        learn_steps: which activation step sizes reconstruction learns: ``all`` or ``linear_inputs`` (the inputs
            of qkv, proj, fc1, fc2 and other Linear/Conv layers, as the reference code).
        weight_grid: ``search`` (percentiles and shrunk ranges, L2.4 error) or ``reference`` (three percentiles,
            L2 error) for the per-channel weight grid of ADFQ.
        attn_kl_form: ``keys`` (temperature-softened pre-softmax scores, distribution over keys, KL(P_fp||P_q)) or
            ``heads`` (the reference code: softmax over the heads axis of the probabilities / T, KL(P_q||P_fp),
            batch mean).
        harden_at: fraction of ``iters`` after which the rounding is hardened (its undecided variables fixed at
            their nearest decision); the remaining iterations learn step sizes on the hard weights. The AdaRound
            exponent schedule ends there. 1.0 hardens at the end.
        holdout: fraction of the calibration images kept out of the reconstruction updates; the output error
            before and after reconstruction is measured on them.
        safeguard: a module whose held-out error got worse keeps its pre-reconstruction state.
        bias_correction: after each module is calibrated (and reconstructed), shift the output of each of its
            Linear layers with a bias, layer after layer, so that its mean over the calibration images and tokens
            is the float model's (empirical bias correction, Nagel et al. 2019). Stored apart from the float bias
            (``QuantLinear.bias_correction``), kept only where it lowers the module's held-out error. None (the
            default) corrects ADFQ, with and without reconstruction, and leaves MinMax and Percentile the plain
            baselines (``corrects_biases``). Where activations carry outlier channels it is worth points of
            Top-1, even after reconstruction; elsewhere a few tenths either way (Swin leans lower), with the KL
            to the float model mostly lower (docs/benchmark.md, *Bias correction by default*).
        cache_device: where the calibration cache lives (``cpu`` or an accelerator); None = model's device. A CPU
            cache feeding a GPU is pinned and copied asynchronously.
        cache_dtype: storage dtype of the cache: ``float16``/``bfloat16`` halve its memory; every computation
            (forward, losses, gradients) stays float32, where the reconstruction loss needs the precision.
        cuda_graphs: on one CUDA device (not under DDP), replay each module's reconstruction forward and
            backward from a CUDA graph instead of launching its several hundred small kernels one by one every
            iteration. No effect on a CPU.
        seed: seeds every random choice of reconstruction.
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
    percentile: float = 0.9999
    overrides: dict[str, dict[str, int]] = field(default_factory=_default_overrides)
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
    kl_temperature: float = 4.0
    kl_lambda: float = 0.1
    qdrop_prob: float = 0.5
    qdrop_until: float = 1.0
    rec_p: float = 2.0
    act_grad: GradMode = "ste"
    learn_steps: Literal["all", "linear_inputs"] = "all"
    weight_grid: Literal["search", "reference"] = "search"
    attn_kl_form: Literal["keys", "heads"] = "keys"
    harden_at: float = 1.0
    holdout: float = 0.1
    safeguard: bool = True
    bias_correction: Optional[bool] = None
    cache_device: Optional[str] = None
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    cuda_graphs: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
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
        choices = {"act_grad": GRAD_MODES, "learn_steps": ("all", "linear_inputs"),
                   "weight_grid": ("search", "reference"), "attn_kl_form": ("keys", "heads"),
                   "cache_dtype": ("float32", "float16", "bfloat16"), "act_family": ("auto", "log")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {allowed}.")
        if not 0.0 < self.harden_at <= 1.0:
            raise ValueError(f"harden_at={self.harden_at!r} must be in (0, 1] (1.0 hardens the rounding at the end).")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout={self.holdout!r} must be in [0, 1) (0.1 keeps a tenth of the images aside).")

    @property
    def corrects_biases(self) -> bool:
        """``bias_correction``, or when it is None: on for ADFQ, off for the baselines."""
        if self.bias_correction is not None:
            return self.bias_correction
        return self.method == "adfq"

    @property
    def effective_rounding_lr(self) -> float:
        """``rounding_lr``, or the budget-scaled rate when it is None (the same product of rate and iterations
        as the reference's 3e-3 x 3,000)."""
        if self.rounding_lr is not None:
            return float(self.rounding_lr)
        return min(0.1, max(3e-3, 3e-3 * 3000 / self.iters))

    # -- presets ----------------------------------------------------------------------------------------------
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

    # -- quantizer factory ------------------------------------------------------------------------------------
    def bits_for(self, module_name: str) -> tuple[int, int]:
        """(weight bits, activation bits) of a module, after ``overrides``."""
        w_bits, a_bits = self.w_bits, self.a_bits
        for pattern, bits in self.overrides.items():
            if fnmatchcase(module_name, pattern):
                w_bits, a_bits = bits.get("w_bits", w_bits), bits.get("a_bits", a_bits)
        return w_bits, a_bits

    def _baseline_search(self) -> str:
        return "minmax" if self.method == "minmax" else "percentile"

    def weight_quantizer(self, module_name: str) -> AdaRoundQuantizer:
        bits = self.bits_for(module_name)[0]
        if self.method == "adfq" and self.weight_grid == "reference":
            q = AdaRoundQuantizer(bits, granularity="channel", search="percentile_mse", p=2.0)
        elif self.method == "adfq":
            q = AdaRoundQuantizer(bits, granularity="channel", search="mse", p=2.4)
        else:
            q = AdaRoundQuantizer(bits, granularity="tensor", search=self._baseline_search(), percentile=self.percentile)
        q.name = f"{module_name}.weight"
        return q

    def _log_family(self, log: Quantizer) -> Quantizer:
        if self.act_family == "log":
            return log
        return BestOfQuantizer(log, UniformQuantizer(log.bits, search="mse", grad=log.grad))

    def activation_quantizer(self, module_name: str, role: Role) -> Quantizer:
        """The quantizer for one activation tensor, chosen by where it sits (the method's table)."""
        bits, grad = self.bits_for(module_name)[1], self.act_grad
        q: Quantizer
        if self.method != "adfq":
            q = UniformQuantizer(bits, search=self._baseline_search(), percentile=self.percentile, grad=grad)
        elif role in ("qkv_input", "fc1_input") and self.ppoq:
            threshold = self.qkv_outlier_threshold if role == "qkv_input" else self.fc1_outlier_threshold
            q = PerPatchOutlierQuantizer(bits, threshold=threshold, grad=grad)
        elif role == "fc2_input" and self.slq:
            q = self._log_family(ShiftLog2Quantizer(bits, base=self.slq_base, grad=grad))
        elif role == "attn_probs" and self.log_softmax:
            q = self._log_family(LogSqrt2Quantizer(bits, grad=grad))
        else:
            p = self.qkv_error_p if role in ("q", "k", "v") else 2.0
            q = UniformQuantizer(bits, search="mse", p=p, grad=grad)
        q.name, q.role = f"{module_name}.{role}", role
        return q
