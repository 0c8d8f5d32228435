"""ASMO: calibrate and reconstruct a converted ViT one module at a time on a carried-forward cache.

The engine is plain PyTorch so that ``quantize()``, the Lightning callback and the reconstruction
LightningModule all run the same code. Each rank holds only its shard of the calibration images; every
random choice is drawn per *global* sample id from a seeded generator, and each rank's loss is its part of
the global batch mean, so summing gradients over ranks reproduces the single-process run.

A fraction of the calibration images (``config.holdout``) never enters an update: each module's output
error is measured on them before and after its reconstruction, and with ``config.safeguard`` a module
whose held-out error got worse is put back to its pre-reconstruction state.

On one CUDA device (``config.cuda_graphs``) each iteration replays the target's forward and backward as
CUDA graphs (:mod:`.cuda_graph`) instead of launching their kernels one by one.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ..config import LINEAR_INPUT_ROLES, ADFQConfig
from ..distributed import all_gather_cat, all_reduce_sum, world
from ..modules import AttentionScores, QuantLinear, recording_scores
from ..quantizers import AdaRoundQuantizer, BestOfQuantizer, PerPatchOutlierQuantizer, Quantizer, calibrating, \
    outermost_quantizers
from .cuda_graph import TargetCall, graph_target
from .losses import attention_kl, attention_kl_heads, cosine_lr, output_loss, rounding_beta
from .units import build_units, run_until

CHUNK = 64  # samples per forward pass while building the cache


@dataclass
class Stage:
    """One reconstruction target: its place in the unit chain and what was measured on it."""

    name: str
    unit: int
    module: nn.Module
    stats: dict = field(default_factory=dict)


def set_quantization(module: nn.Module, enabled: bool) -> None:
    """Switch every quantizer in ``module`` on (quantized behaviour) or off (exact float behaviour)."""
    for q in module.modules():
        if isinstance(q, Quantizer):
            q.enabled = enabled


def _learnable(module: nn.Module, learn_steps: str = "all",
               candidates: bool = False) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(AdaRound variables, activation step sizes) inside ``module``.

    A quantizer's ``step_sizes()`` speaks for the quantizers nested inside it: the weight grid inside an
    AdaRound quantizer is a UniformQuantizer too, but it is frozen (AdaRound returns no step sizes).
    ``learn_steps="linear_inputs"`` keeps only the step sizes of quantizers that feed a Linear/Conv;
    ``candidates`` includes the step sizes of grids a quantizer may still choose at calibration.
    """
    rounding = [q.alpha for q in module.modules() if isinstance(q, AdaRoundQuantizer)]
    steps = [p for q in outermost_quantizers(module) if learn_steps == "all" or q.role in LINEAR_INPUT_ROLES
             for p in (q.candidate_step_sizes() if candidates else q.step_sizes())]
    return rounding, steps


def holdout_split(num_samples: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out ids, update ids) of the global calibration set, identical on every rank.

    With too few images to keep any aside, both are every image (the errors are then in-sample).
    """
    held = min(int(round(fraction * num_samples)), num_samples - 1)
    if held <= 0:
        everything = torch.arange(num_samples)
        return everything, everything
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + 7919))
    return order[:held].sort().values, order[held:].sort().values


def quantizer_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the learnable quantizer parameters of ``module`` (what reconstruction changes)."""
    rounding, steps = _learnable(module)
    learnable = {id(p) for p in rounding + steps}
    return {n: p.detach().clone() for n, p in module.named_parameters() if id(p) in learnable}


def undecided_fraction(module: nn.Module) -> float:
    """Share of AdaRound variables whose soft rounding is still strictly between 0 and 1."""
    values = [q.rounding() for q in module.modules() if isinstance(q, AdaRoundQuantizer)]
    total = sum(v.numel() for v in values)
    return float(sum(((v > 0) & (v < 1)).sum() for v in values)) / total if total else 0.0


#: Index of the step-size group in the optimizer of :func:`make_optimizer` (its learning rate follows a cosine).
STEP_SIZE_GROUP = 1


def make_optimizer(model: nn.Module, config: ADFQConfig) -> torch.optim.Optimizer:
    """One Adam over every AdaRound variable (group 0, ``rounding_lr``) and every learnable step size (group 1,
    ``scale_lr``), built once: only the active stage's variables get gradients, and one ``step()`` is one
    reconstruction iteration."""
    rounding, steps = _learnable(model, config.learn_steps, candidates=True)
    return torch.optim.Adam([{"params": rounding, "lr": config.effective_rounding_lr},
                             {"params": steps, "lr": config.scale_lr}])


def _batched(x: torch.Tensor) -> Iterator[torch.Tensor]:
    for i in range(0, x.shape[0], CHUNK):
        yield x[i : i + CHUNK]


def _per_sample(t: torch.Tensor, n: int) -> torch.Tensor:
    """(n*k, ...) as (n, k, ...): windows of one image stay together."""
    return t.reshape(n, -1, *t.shape[1:])


class Reconstructor:
    """Walks the stages of a converted model: cache inputs, calibrate, optionally reconstruct, carry forward.

    Args:
        model: a model already passed through :func:`adfq_lightning.modules.convert`, in eval mode.
        images: this rank's calibration images.
        sample_ids: global id of each local image (0..num_samples-1), identical across any sharding.
        num_samples: size of the global calibration set.
    """

    def __init__(self, model: nn.Module, config: ADFQConfig, images: torch.Tensor, sample_ids: torch.Tensor,
                 num_samples: int, device: Optional[torch.device] = None) -> None:
        self.model, self.config = model, config
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.cache_device = torch.device(config.cache_device) if config.cache_device else self.device
        self.cache_dtype = getattr(torch, config.cache_dtype)
        # a CPU cache feeding an accelerator is pinned, so its batches copy asynchronously
        self._pin = self.cache_device.type == "cpu" and self.device.type == "cuda"
        self.images = self._store(images.float())
        self.sample_ids = sample_ids.to(torch.long).cpu()
        self.num_samples = num_samples
        if config.batch_size > num_samples:
            warnings.warn(f"batch_size={config.batch_size} is larger than the {num_samples} calibration images: "
                          f"reconstruction uses batches of {num_samples}. Give at least batch_size images (1024 in the "
                          "paper) to run the recipe as configured.", stacklevel=2)
            self.config = config = config.replace(batch_size=num_samples)
        if num_samples < world()[1]:  # raised on every rank alike (a lone failing rank would hang the others)
            raise ValueError(f"{num_samples} calibration images cannot be sharded over {world()[1]} ranks: give at "
                             "least one image per rank.")
        self.local_row = torch.full((num_samples,), -1, dtype=torch.long)
        self.local_row[self.sample_ids] = torch.arange(len(self.sample_ids))
        self.heldout_ids, self.update_ids = holdout_split(num_samples, config.holdout, config.seed)
        learnable = {id(p) for group in _learnable(model) for p in group}
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        for p in model.parameters():  # only rounding variables and step sizes are trained; restored at the end
            p.requires_grad_(id(p) in learnable)
        set_quantization(model, False)
        self.units = build_units(model, self._load(self.images[:1]))
        self.stages = [Stage(name, u, m) for u, unit in enumerate(self.units) for name, m in unit.targets]
        self.stage = 0
        self.iteration = 0
        self._cached_unit = -1
        self._stage_ready = False
        self._stage_started = 0.0
        self._initial_state: dict[str, torch.Tensor] = {}  # the current stage's quantizers before reconstruction
        # under DDP a rank's share of the batch varies per iteration; a graph replays fixed shapes
        self._use_graphs = config.cuda_graphs and self.device.type == "cuda" and world()[1] == 1
        self._graph: Optional[TargetCall] = None
        self._graph_phase: Optional[tuple[int, bool]] = None

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.stage >= len(self.stages)

    @property
    def current(self) -> Stage:
        return self.stages[self.stage]

    def state_dict(self) -> dict:
        return {"stage": self.stage, "iteration": self.iteration, "stats": [s.stats for s in self.stages],
                "initial_state": {k: v.cpu() for k, v in self._initial_state.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.iteration = int(state["stage"]), int(state["iteration"])
        for s, stats in zip(self.stages, state["stats"]):
            s.stats = dict(stats)
        self._initial_state = {k: v.to(self.device) for k, v in state.get("initial_state", {}).items()}
        self._cached_unit, self._stage_ready = -1, False
        self._graph, self._graph_phase = None, None  # captured for the state replaced here
        if self.done:  # resumed from the last checkpoint of a finished run: leave the model as finish_stage does
            set_quantization(self.model, True)
            for p, flag in self._requires_grad:
                p.requires_grad_(flag)

    @property
    def stage_ready(self) -> bool:
        return self._stage_ready

    def progress(self) -> tuple[int, int]:
        """(done, total) in iterations over every stage; a stage counts one unit without reconstruction."""
        per_stage = self.config.iters if self.config.reconstruct else 1
        done = self.stage * per_stage + (self.iteration if self.config.reconstruct and not self.done else 0)
        return done, len(self.stages) * per_stage

    # -- quantization state -----------------------------------------------------------------------------------
    def _enable_finished(self, upto: int) -> None:
        """Quantize the stages before ``upto``; keep the others in float."""
        for i, s in enumerate(self.stages):
            set_quantization(s.module, i < upto)

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        """Into the cache: its device and storage dtype (pinned when it feeds an accelerator from the CPU)."""
        t = t.to(self.cache_device, self.cache_dtype)
        return t.pin_memory() if self._pin else t

    def _load(self, t: torch.Tensor) -> torch.Tensor:
        """Out of the cache, for computation: the compute device, float32."""
        return t.to(self.device, torch.float32, non_blocking=True)

    @torch.no_grad()
    def _run_unit(self, u: int, x: torch.Tensor) -> torch.Tensor:
        run = self.units[u].run
        return self._store(torch.cat([run(self._load(b)) for b in _batched(x)]))

    @torch.no_grad()
    def _capture(self, u: int, target: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        inputs, kwargs = [], {}
        for b in _batched(x):
            args, kwargs = run_until(self.units[u].run, target, self._load(b))
            if len(args) != 1:
                raise RuntimeError(f"{type(target).__name__} is called with {len(args)} positional inputs; "
                                   "reconstruction supports one (pass extras as keyword arguments).")
            inputs.append(_per_sample(args[0], b.shape[0]))
        return self._store(torch.cat(inputs)), kwargs

    def _forward(self, module: nn.Module, x: torch.Tensor,
                 graph: Optional[TargetCall] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Target output (and attention scores) for per-sample inputs ``x`` of shape (n, k, ...), run eagerly or
        replayed from the stage's ``graph``."""
        n, flat = x.shape[0], self._load(x.flatten(0, 1))
        if graph is not None:
            out, scores = graph(flat)
        else:
            out = module(flat, **self._kwargs)
            scores = module.scores if isinstance(module, AttentionScores) else None
        return _per_sample(out, n), (None if scores is None else _per_sample(scores, n))

    # -- cache ------------------------------------------------------------------------------------------------
    def _advance_cache_to(self, unit: int) -> None:
        """Carry the quantized- and float-prefix inputs forward, one unit at a time, up to ``unit``."""
        if self._cached_unit < 0 or self._cached_unit > unit:
            self.x_q, self.x_fp, self._cached_unit = self.images, self.images, 0
        while self._cached_unit < unit:
            u = self._cached_unit
            done_upto = next((i for i, s in enumerate(self.stages) if s.unit > u), len(self.stages))
            self._enable_finished(done_upto)
            self.x_q = self._run_unit(u, self.x_q)
            set_quantization(self.model, False)
            self.x_fp = self._run_unit(u, self.x_fp)
            self._cached_unit += 1

    def prepare_stage(self) -> None:
        """Build the current target's cache, calibrate its activation quantizers, make its variables learnable."""
        stage, cfg = self.current, self.config
        self._stage_started = time.perf_counter()
        self._advance_cache_to(stage.unit)
        module = stage.module
        self._enable_finished(self.stage)
        self.t_q, self._kwargs = self._capture(stage.unit, module, self.x_q)
        set_quantization(self.model, False)
        self.t_fp, _ = self._capture(stage.unit, module, self.x_fp)
        with torch.no_grad(), recording_scores(module):
            outs = [self._forward(module, b) for b in _batched(self.t_fp)]
        self.out_fp = self._store(torch.cat([o for o, _ in outs]))
        self.scores_fp = None if outs[0][1] is None else self._store(torch.cat([s for _, s in outs]))
        self.per_sample_norm = self.out_fp[0].numel() / self.out_fp.shape[2]
        set_quantization(module, True)
        if self.iteration == 0:
            self._calibrate(module)
            self._initial_state = quantizer_state(module)
            stage.stats["init_error"] = self.output_error()
            stage.stats["heldout_images"] = int(len(self.heldout_ids)) if len(self.heldout_ids) < self.num_samples else 0
        stage.stats["families"] = {q.name: q.family for q in module.modules() if isinstance(q, BestOfQuantizer)}
        stage.stats["outlier_ratio"] = {
            q.name: float(q.outlier_ratio) for q in module.modules() if isinstance(q, PerPatchOutlierQuantizer)}
        stage.stats["cache_mb"] = sum(t.numel() * t.element_size() for t in (
            self.x_q, self.x_fp, self.t_q, self.t_fp, self.out_fp,
            *(() if self.scores_fp is None else (self.scores_fp,)))) / 2**20
        rounding, steps = self._stage_parameters()
        soft = cfg.reconstruct and self.iteration < self.harden_iteration
        for p in steps:
            p.requires_grad_(cfg.reconstruct)
        for p in rounding:
            p.requires_grad_(soft)
        for q in self._adaround(module):
            q.soft = soft
        self._stage_ready = True

    @property
    def harden_iteration(self) -> int:
        """The iteration at which the rounding becomes hard (``config.harden_at``); step sizes learn on after it."""
        return round(self.config.harden_at * self.config.iters)

    def _harden(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Fix every rounding variable of the current stage at its hard decision and stop learning it."""
        module = self.current.module
        if any(q.soft for q in self._adaround(module)):
            self.current.stats["undecided"] = undecided_fraction(module)
        for q in self._adaround(module):
            q.soft = False
            q.alpha.requires_grad_(False)
            q.alpha.grad = None  # else Adam keeps stepping it with zero gradients
            if optimizer is not None:
                optimizer.state.pop(q.alpha, None)

    @torch.no_grad()
    def _calibrate(self, module: nn.Module) -> None:
        """Initialise the target's activation quantizers on the first ``init_samples`` *global* images."""
        mine = self.sample_ids < self.config.init_samples
        ids = all_gather_cat(self.sample_ids[mine].to(self.device))
        x = all_gather_cat(self._load(self.t_q[mine.to(self.t_q.device)]))[ids.argsort()]
        with calibrating(module):
            module(x.flatten(0, 1), **self._kwargs)

    @staticmethod
    def _adaround(module: nn.Module) -> list[AdaRoundQuantizer]:
        return [q for q in module.modules() if isinstance(q, AdaRoundQuantizer)]

    def _stage_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return _learnable(self.current.module, self.config.learn_steps)

    def _local_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The cache rows of this rank's images among the global sample ``ids`` (on the cache's device)."""
        rows = self.local_row[ids]
        return rows[rows >= 0].to(self.cache_device)

    @torch.no_grad()
    def output_error(self, ids: Optional[torch.Tensor] = None) -> float:
        """Global mean output error of the current target (no QDrop) over the global sample ``ids``
        (default: the held-out images)."""
        ids = self.heldout_ids if ids is None else ids
        rows = self._local_rows(ids)
        module, total = self.current.module, torch.zeros((), dtype=torch.float64, device=self.device)
        for chunk in _batched(rows):
            out, _ = self._forward(module, self.t_q[chunk])
            total += output_loss(out, self._load(self.out_fp[chunk]), self.config.rec_p, self.per_sample_norm,
                                 1).double()
        return float(all_reduce_sum(total)) / len(ids)

    # -- optimisation -----------------------------------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer,
             backward: Optional[Callable[[torch.Tensor], None]] = None) -> dict[str, torch.Tensor]:
        """One reconstruction iteration of the current stage; returns its global loss terms (0-d tensors).

        ``optimizer`` is :func:`make_optimizer`'s (or a wrapper with ``zero_grad``/``step``/``param_groups``, such
        as Lightning's); ``backward`` runs the backward pass (default ``loss.backward()``).
        """
        if not self._stage_ready:
            self.prepare_stage()
        cfg, stage, it = self.config, self.current, self.iteration
        module, world_size = stage.module, world()[1]
        if it == self.harden_iteration:
            self._harden(optimizer)
        seed = cfg.seed * 1_000_003 + self.stage * 100_003 + it
        draw = torch.randint(0, len(self.update_ids), (cfg.batch_size,), generator=torch.Generator().manual_seed(seed))
        rows = self.local_row[self.update_ids[draw]]
        positions = (rows >= 0).nonzero().squeeze(1)
        rows = rows[positions].to(self.t_q.device, non_blocking=True)
        x = self._load(self.t_q[rows])
        if cfg.qdrop_prob < 1.0 and it < cfg.qdrop_until * cfg.iters:
            # drawn on the compute device for the whole global batch, then this rank's rows taken
            noise_gen = torch.Generator(device=self.device).manual_seed(seed)
            noise = torch.rand((cfg.batch_size, *x.shape[1:]), generator=noise_gen, device=self.device)
            x = torch.where(noise[positions.to(self.device)] < cfg.qdrop_prob, x, self._load(self.t_fp[rows]))
        with torch.enable_grad(), recording_scores(module):
            rec = kl = torch.zeros((), device=self.device)
            # Under DDP a rank may hold none of this iteration's global batch: it adds nothing to rec/kl (and an
            # empty forward would fail), but still takes part in the gradient all-reduce below.
            if len(rows):
                out, scores = self._forward(module, x, self._stage_graph(x))
                rec = output_loss(out, self._load(self.out_fp[rows]), cfg.rec_p, self.per_sample_norm,
                                  cfg.batch_size)
                if cfg.attn_kl and scores is not None and self.scores_fp is not None:
                    kl_term = attention_kl if cfg.attn_kl_form == "keys" else attention_kl_heads
                    kl = kl_term(scores, self._load(self.scores_fp[rows]), cfg.kl_temperature, cfg.batch_size)
            hard = self.harden_iteration
            beta = rounding_beta(min(it, hard), hard, cfg.warmup, cfg.beta_start, cfg.beta_end)
            rnd = torch.zeros((), device=self.device)
            if cfg.warmup * hard <= it < hard:
                rnd = cfg.rounding_weight * sum((q.regularizer(beta) for q in self._adaround(module)), rnd)
            loss = rec + kl / cfg.kl_lambda + rnd / world_size
            optimizer.zero_grad(set_to_none=False)
            if loss.requires_grad:  # not when this rank has no samples and the rounding term is still off
                (backward or torch.Tensor.backward)(loss)
        self._sync_gradients()
        optimizer.param_groups[STEP_SIZE_GROUP]["lr"] = cosine_lr(cfg.scale_lr, it, cfg.iters)
        optimizer.step()
        terms = all_reduce_sum(torch.stack([rec.detach(), kl.detach(), rnd.detach() / world_size]))
        self.iteration += 1
        # tensors, not floats: reading them would wait for the device every iteration
        return {"loss": terms[0] + terms[1] / cfg.kl_lambda + terms[2], "rec": terms[0], "kl": terms[1],
                "round": terms[2], "beta": torch.tensor(beta)}

    def _stage_graph(self, x: torch.Tensor) -> Optional[TargetCall]:
        """The current stage's CUDA graph for batches like ``x`` (None: run eagerly), captured at the first
        iteration of each phase of the stage (soft rounding, then hard after :meth:`_harden`)."""
        phase = (self.stage, self.iteration >= self.harden_iteration)
        if self._use_graphs and self._graph_phase != phase:
            self._graph, self._graph_phase = None, None  # free the previous phase's graph memory first
            try:
                self._graph = graph_target(self.current.module, self._kwargs, self._load(x.flatten(0, 1)))
            except RuntimeError as error:  # an operation that cannot be captured: stay correct, only slower
                warnings.warn(f"CUDA graph capture of {self.current.name} failed ({error}); reconstruction goes on "
                              "without graphs. Set cuda_graphs=False to skip the attempt.", stacklevel=2)
                self._use_graphs = False
            self._graph_phase = phase
        return self._graph

    def _sync_gradients(self) -> None:
        """Sum the current stage's gradients over ranks (one collective for all of them)."""
        params = [p for group in self._stage_parameters() for p in group]
        if world()[1] == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        for p, chunk in zip(params, flat.split([p.numel() for p in params])):
            p.grad = chunk.view_as(p).clone()

    def finish_stage(self, optimizer: Optional[torch.optim.Optimizer] = None) -> Stage:
        """Harden the rounding, apply the safeguard, freeze the stage, free its optimizer state, and move on."""
        stage, module, cfg = self.current, self.current.module, self.config
        rounding, steps = self._stage_parameters()
        if cfg.reconstruct:
            stage.stats["soft_error"] = self.output_error()  # with the rounding as it was when the budget ended
        self._harden(optimizer)
        for p in rounding + steps:
            p.requires_grad_(False)
            p.grad = None  # else Adam keeps stepping it with zero gradients and rebuilds the state popped here
            if optimizer is not None:
                optimizer.state.pop(p, None)
        if cfg.reconstruct:
            stage.stats["reconstructed_error"] = error = self.output_error()
            stage.stats["reverted"] = cfg.safeguard and error > stage.stats["init_error"]
            if stage.stats["reverted"]:  # worse on images it never saw: keep nearest rounding and initial steps
                with torch.no_grad():
                    for name, value in self._initial_state.items():
                        module.get_parameter(name).copy_(value)
                error = stage.stats["init_error"]
            stage.stats["final_error"] = error
        else:  # nothing changed since init_error was measured
            stage.stats["final_error"] = stage.stats["init_error"]
        if cfg.corrects_biases:
            self._correct_biases()
        self._initial_state = {}
        stage.stats["iters"] = self.iteration
        stage.stats["seconds"] = stage.stats.get("seconds", 0.0) + time.perf_counter() - self._stage_started
        del self.t_q, self.t_fp, self.out_fp, self.scores_fp
        self._graph, self._graph_phase = None, None
        self.stage, self.iteration, self._stage_ready = self.stage + 1, 0, False
        if self.done:
            set_quantization(self.model, True)
            for p, flag in self._requires_grad:
                p.requires_grad_(flag)
            del self.x_q, self.x_fp
        return stage

    @torch.no_grad()
    def _correct_biases(self) -> None:
        """Bias correction (``config.corrects_biases``): each Linear of the target, in call order, gets the bias that
        moves its mean output on the quantized prefix (update images only) to the float model's. The module keeps
        the corrections only if its held-out error falls."""
        stage, module = self.current, self.current.module
        layers = [m for m in module.modules() if isinstance(m, QuantLinear) and m.correctable]
        if not layers:
            return
        set_quantization(module, False)
        float_means = self._output_means(layers, self.t_fp)
        set_quantization(module, True)
        for layer, float_mean in zip(layers, float_means):
            layer.bias_correction = (float_mean - self._output_means([layer], self.t_q)[0]).to(layer.bias.dtype)
        stage.stats["bias_corrected_error"] = error = self.output_error()
        stage.stats["bias_corrected"] = error < stage.stats["final_error"]
        if stage.stats["bias_corrected"]:
            stage.stats["final_error"] = error
        else:
            for layer in layers:
                layer.bias_correction = None

    def _output_means(self, layers: list[nn.Module], cache: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's output averaged over the update images (all ranks) and tokens while the target runs on
        ``cache``."""
        sums = [torch.zeros(layer.out_features, dtype=torch.float64, device=self.device) for layer in layers]
        counts = torch.zeros(len(layers), dtype=torch.float64, device=self.device)

        def accumulate(i: int):
            def hook(_layer, _args, out):
                flat = out.detach().reshape(-1, out.shape[-1]).double()
                sums[i] += flat.sum(0)
                counts[i] += flat.shape[0]
            return hook

        handles = [layer.register_forward_hook(accumulate(i)) for i, layer in enumerate(layers)]
        try:
            for chunk in _batched(self._local_rows(self.update_ids)):
                self._forward(self.current.module, cache[chunk])
        finally:
            for handle in handles:
                handle.remove()
        *totals, counts = all_reduce_sum(torch.cat([*sums, counts])).split([*(len(t) for t in sums), len(layers)])
        return [(total / count).float() for total, count in zip(totals, counts)]

    def stage_complete(self) -> bool:
        return not self.config.reconstruct or self.iteration >= self.config.iters

    def run(self, log: Optional[Callable[[str, int, dict], None]] = None, log_every: int = 1,
            on_stage: Optional[Callable[[Stage], None]] = None) -> None:
        """Every stage to the end, in this process (the Lightning module does the same as training steps).

        ``log(module name, iteration, loss terms as floats)`` is called every ``log_every`` iterations (reading
        the terms waits for the device) and ``on_stage(stage)`` after each stage.
        """
        optimizer = make_optimizer(self.model, self.config) if self.config.reconstruct else None
        while not self.done:
            if not self._stage_ready:
                self.prepare_stage()
            while not self.stage_complete():
                terms = self.step(optimizer)
                if log is not None and (self.iteration % log_every == 0 or self.stage_complete()):
                    log(self.current.name, self.iteration, {k: float(v) for k, v in terms.items()})
            stage = self.finish_stage(optimizer)
            if on_stage is not None:
                on_stage(stage)
