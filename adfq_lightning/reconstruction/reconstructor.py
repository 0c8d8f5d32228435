"""ASMO's stage loop: calibrate and reconstruct a converted ViT one module at a time on a carried-forward cache.

The loop is plain PyTorch so that ``quantize()``, the Lightning callback and the reconstruction LightningModule
all run the same code. Each rank holds only its shard of the calibration images; every random choice is drawn
per *global* sample id from a seeded generator, and each rank's loss is its part of the global batch mean, so
summing gradients over ranks reproduces the single-process run. The jobs around the loop live beside it:
:mod:`.cache` (the activation cache), :mod:`.heldout` (held-out error and safeguard), :mod:`.bias_correction`,
:mod:`.cross_rank` (cross-rank sums), :mod:`.learnable` (what is learned and its optimizer), :mod:`.schedule`
(each module's schedule and adaptive budget) and :mod:`.cuda_graph`.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..config import ADFQConfig
from ..modules import recording_scores
from ..quantizers import BestOfQuantizer, PerPatchOutlierQuantizer, calibrating, set_quantization
from .bias_correction import correct_biases
from .cache import ActivationCache
from .cross_rank import Shard, all_gather_cat, all_reduce_sum, sum_gradients, world
from .compiled import CompiledTargets
from .cuda_graph import PhaseGraphs
from .heldout import apply_safeguard, holdout_split, output_error
from .learnable import (ROUNDING_GROUP, STEP_SIZE_GROUP, adaround_quantizers, freeze, harden, learnable_parameters,
                        make_optimizer, quantizer_state)
from .losses import attention_kl, attention_kl_heads, cosine_lr, output_loss, rounding_beta
from .schedule import StageBudget
from .units import build_units

#: ``log(module name, iteration, loss terms as floats)``
LogFn = Callable[[str, int, dict], None]


@dataclass
class Stage:
    """One reconstruction target: its place in the unit chain and what was measured on it."""

    name: str
    unit: int
    module: nn.Module
    stats: dict = field(default_factory=dict)


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
        cache_device = torch.device(config.cache_device) if config.cache_device else self.device
        self.cache = ActivationCache(images, self.device, cache_device, getattr(torch, config.cache_dtype))
        self.shard = Shard(sample_ids, num_samples)
        self.num_samples = num_samples
        if config.batch_size > num_samples:
            warnings.warn(f"batch_size={config.batch_size} is larger than the {num_samples} calibration images: "
                          f"reconstruction uses batches of {num_samples}. Give at least batch_size images (1024 in the "
                          "paper) to run the recipe as configured.", stacklevel=2)
            self.config = config = config.replace(batch_size=num_samples)
        if num_samples < world()[1]:  # raised on every rank alike (a lone failing rank would hang the others)
            raise ValueError(f"{num_samples} calibration images cannot be sharded over {world()[1]} ranks: give at "
                             "least one image per rank.")
        self.heldout_ids, self.update_ids = holdout_split(num_samples, config.holdout, config.seed)
        learnable = {id(p) for group in learnable_parameters(model) for p in group}
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        for p in model.parameters():  # only rounding variables and step sizes are trained; restored at the end
            p.requires_grad_(id(p) in learnable)
        set_quantization(model, False)
        self.units = build_units(model, self.cache.load(self.cache.images[:1]))
        self.stages = [Stage(name, u, m) for u, unit in enumerate(self.units) for name, m in unit.targets]
        self.stage = 0
        self.iteration = 0
        self.budget = StageBudget(config.iters)  # the current stage's schedule and (adaptive) end
        self.last_terms: Optional[dict] = None  # the current stage's latest loss terms
        self._stage_ready = False
        self._stage_started = 0.0
        self._initial_state: dict[str, torch.Tensor] = {}  # the current stage's quantizers before reconstruction
        # under DDP a rank's share of the batch varies per iteration; a graph replays fixed shapes
        self.graphs = PhaseGraphs(config.cuda_graphs and self.device.type == "cuda" and world()[1] == 1)
        self.compiled = CompiledTargets(config.torch_compile and not self.graphs.enabled)  # graphs win on CUDA

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.stage >= len(self.stages)

    @property
    def current(self) -> Stage:
        return self.stages[self.stage]

    def state_dict(self) -> dict:
        return {"stage": self.stage, "iteration": self.iteration, "stats": [s.stats for s in self.stages],
                "initial_state": {k: v.cpu() for k, v in self._initial_state.items()},
                "budget": self.budget.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.iteration = int(state["stage"]), int(state["iteration"])
        self.budget = StageBudget(self.config.iters, **state.get("budget", {}))
        for s, stats in zip(self.stages, state["stats"]):
            s.stats = dict(stats)
        self._initial_state = {k: v.to(self.device) for k, v in state.get("initial_state", {}).items()}
        self.cache.reset()
        self._stage_ready = False
        self.graphs.clear()  # captured for the state replaced here
        if self.done:  # resumed from the last checkpoint of a finished run: leave the model as finish_stage does
            self._restore_model()

    def progress(self) -> tuple[int, int]:
        """(done, total) in iterations over every stage; a stage counts one unit without reconstruction."""
        per_stage = self.config.iters if self.config.reconstruct else 1
        done = self.stage * per_stage + (self.iteration if self.config.reconstruct and not self.done else 0)
        return done, len(self.stages) * per_stage

    @property
    def harden_iteration(self) -> int:
        """The schedule position at which the rounding becomes hard (``config.harden_at``); step sizes learn on
        after it."""
        return round(self.config.harden_at * self.config.iters)

    def stage_complete(self) -> bool:
        return not self.config.reconstruct or self.iteration >= self.budget.end

    def _enable_finished(self, upto: int) -> None:
        """Quantize the stages before ``upto``; keep the others in float."""
        for i, s in enumerate(self.stages):
            set_quantization(s.module, i < upto)

    def _quantize_through(self, unit: int) -> None:
        """Quantize the stages of units up to ``unit``; keep the others in float."""
        self._enable_finished(next((i for i, s in enumerate(self.stages) if s.unit > unit), len(self.stages)))

    def _stage_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return learnable_parameters(self.current.module, self.config.learn_steps)

    def _restore_model(self) -> None:
        set_quantization(self.model, True)
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)

    # -- a stage's start and end ------------------------------------------------------------------------------
    def prepare_stage(self) -> None:
        """Build the current target's cache, calibrate its activation quantizers, make its variables learnable."""
        stage, cfg, cache = self.current, self.config, self.cache
        module, run = stage.module, self.units[stage.unit].run
        self._stage_started = time.perf_counter()
        cache.advance_to(stage.unit, [u.run for u in self.units], self._quantize_through,
                         lambda: set_quantization(self.model, False))
        self._enable_finished(self.stage)
        cache.t_q, cache.kwargs = cache.capture(run, module, cache.x_q)
        set_quantization(self.model, False)
        cache.t_fp, _ = cache.capture(run, module, cache.x_fp)
        cache.record_float_outputs(module)
        set_quantization(module, True)
        if self.iteration == 0:
            self._calibrate(module)
            self._initial_state = quantizer_state(module)
            stage.stats["init_error"] = self.output_error()
            held = len(self.heldout_ids)
            stage.stats["heldout_images"] = int(held) if held < self.num_samples else 0
        stage.stats["families"] = {q.name: q.family for q in module.modules() if isinstance(q, BestOfQuantizer)}
        stage.stats["outlier_ratio"] = {
            q.name: float(q.outlier_ratio) for q in module.modules() if isinstance(q, PerPatchOutlierQuantizer)}
        stage.stats["cache_mb"] = cache.megabytes()
        rounding, steps = self._stage_parameters()
        soft = cfg.reconstruct and self.budget.position(self.iteration) < self.harden_iteration
        for p in steps:
            p.requires_grad_(cfg.reconstruct)
        for p in rounding:
            p.requires_grad_(soft)
        for q in adaround_quantizers(module):
            q.soft = soft
        self._stage_ready = True

    @torch.no_grad()
    def _calibrate(self, module: nn.Module) -> None:
        """Initialise the target's activation quantizers on the first ``init_samples`` *global* images."""
        cache, sample_ids = self.cache, self.shard.sample_ids
        mine = sample_ids < self.config.init_samples
        ids = all_gather_cat(sample_ids[mine].to(self.device))
        x = all_gather_cat(cache.load(cache.t_q[mine.to(cache.t_q.device)]))[ids.argsort()]
        with calibrating(module):
            module(x.flatten(0, 1), **cache.kwargs)

    def output_error(self, ids: Optional[torch.Tensor] = None) -> float:
        """Global mean output error of the current target (no QDrop) over the global sample ``ids``
        (default: the held-out images)."""
        ids = self.heldout_ids if ids is None else ids
        return output_error(self.cache, self.current.module, self.shard.own_rows(ids), len(ids), self.config.rec_p)

    def _harden(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        undecided = harden(self.current.module, optimizer)
        if undecided is not None:
            self.current.stats["undecided"] = undecided

    def finish_stage(self, optimizer: Optional[torch.optim.Optimizer] = None) -> Stage:
        """Harden the rounding, apply the safeguard, freeze the stage, free its optimizer state, and move on."""
        stage, module, cfg = self.current, self.current.module, self.config
        rounding, steps = self._stage_parameters()
        if cfg.reconstruct:
            stage.stats["soft_error"] = self.output_error()  # with the rounding as it was when the budget ended
        self._harden(optimizer)
        freeze(rounding + steps, optimizer)
        if cfg.reconstruct:
            apply_safeguard(stage.stats, module, self._initial_state, self.output_error(), cfg.safeguard)
        else:  # nothing changed since init_error was measured
            stage.stats["final_error"] = stage.stats["init_error"]
        if cfg.corrects_biases:
            correct_biases(self.cache, module, self.shard.own_rows(self.update_ids), stage.stats, self.output_error)
        self._initial_state = {}
        stage.stats["iters"] = self.iteration
        stage.stats["seconds"] = stage.stats.get("seconds", 0.0) + time.perf_counter() - self._stage_started
        self.cache.release_target()
        self.graphs.clear()
        self.stage, self.iteration, self._stage_ready = self.stage + 1, 0, False
        self.budget = StageBudget(cfg.iters)
        if self.done:
            self._restore_model()
            self.cache.release()
        return stage

    # -- optimisation -----------------------------------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer,
             backward: Optional[Callable[[torch.Tensor], None]] = None) -> dict[str, torch.Tensor]:
        """One reconstruction iteration of the current stage; returns its global loss terms (0-d tensors).

        ``optimizer`` is :func:`make_optimizer`'s (or a wrapper with ``zero_grad``/``step``/``param_groups``, such
        as Lightning's); ``backward`` runs the backward pass (default ``loss.backward()``).
        """
        if not self._stage_ready:
            self.prepare_stage()
        cfg, stage, it, cache = self.config, self.current, self.iteration, self.cache
        module, world_size = stage.module, world()[1]
        hard = self.harden_iteration
        if cfg.adaptive_iters and self.budget.check_due(it, cfg.warmup * hard):
            self.budget.observe(it, self.output_error())
            if self.budget.switch is not None:
                stage.stats["adaptive_switch"] = it
        at = self.budget.position(it)  # where the schedules are
        if self.budget.crossed(it, hard):
            self._harden(optimizer)
        seed = cfg.seed * 1_000_003 + self.stage * 100_003 + it
        draw = torch.randint(0, len(self.update_ids), (cfg.batch_size,), generator=torch.Generator().manual_seed(seed))
        rows = self.shard.rows(self.update_ids[draw])
        positions = (rows >= 0).nonzero().squeeze(1)
        rows = rows[positions].to(cache.t_q.device, non_blocking=True)
        x = cache.load(cache.t_q[rows])
        if cfg.qdrop_prob < 1.0 and at < cfg.qdrop_until * cfg.iters:
            # drawn on the compute device for the whole global batch, then this rank's rows taken
            noise_gen = torch.Generator(device=self.device).manual_seed(seed)
            noise = torch.rand((cfg.batch_size, *x.shape[1:]), generator=noise_gen, device=self.device)
            x = torch.where(noise[positions.to(self.device)] < cfg.qdrop_prob, x, cache.load(cache.t_fp[rows]))
        with torch.enable_grad(), recording_scores(module):
            rec = kl = torch.zeros((), device=self.device)
            # Under DDP a rank may hold none of this iteration's global batch: it adds nothing to rec/kl (and an
            # empty forward would fail), but still takes part in the gradient all-reduce below.
            if len(rows):
                phase = (self.stage, at >= hard)
                call = self.graphs.get(phase, stage.name, module, cache.kwargs, x.flatten(0, 1)) \
                    or self.compiled.get(module, cache.kwargs)
                try:
                    out, scores = cache.forward(module, x, call)
                except Exception as error:  # noqa: BLE001 - a compiler error of any kind: run eagerly instead
                    if call is None or not self.compiled.enabled:
                        raise
                    self.compiled.failed(stage.name, error)
                    out, scores = cache.forward(module, x)
                rec = output_loss(out, cache.load(cache.out_fp[rows]), cfg.rec_p, cache.per_sample_norm,
                                  cfg.batch_size)
                if cfg.attn_kl and scores is not None and cache.scores_fp is not None:
                    kl_term = attention_kl if cfg.attn_kl_form == "keys" else attention_kl_heads
                    kl = kl_term(scores, cache.load(cache.scores_fp[rows]), cfg.kl_temperature, cfg.batch_size)
            beta = rounding_beta(min(at, hard), hard, cfg.warmup, cfg.beta_start, cfg.beta_end)
            rnd = torch.zeros((), device=self.device)
            if cfg.warmup * hard <= at < hard:
                rnd = cfg.rounding_weight * sum((q.regularizer(beta) for q in adaround_quantizers(module)), rnd)
            loss = rec + kl / cfg.kl_lambda + rnd / world_size
            optimizer.zero_grad(set_to_none=False)
            if loss.requires_grad:  # not when this rank has no samples and the rounding term is still off
                (backward or torch.Tensor.backward)(loss)
        sum_gradients([p for group in self._stage_parameters() for p in group])
        optimizer.param_groups[STEP_SIZE_GROUP]["lr"] = cosine_lr(cfg.scale_lr, at, cfg.iters)
        # the rounding variables' rate follows the budget they are left, as it does a shorter fixed one
        optimizer.param_groups[ROUNDING_GROUP]["lr"] = cfg.rounding_lr_for(cfg.iters / self.budget.rate)
        optimizer.step()
        terms = all_reduce_sum(torch.stack([rec.detach(), kl.detach(), rnd.detach() / world_size]))
        self.iteration += 1
        # tensors, not floats: reading them would wait for the device every iteration
        return {"loss": terms[0] + terms[1] / cfg.kl_lambda + terms[2], "rec": terms[0], "kl": terms[1],
                "round": terms[2], "beta": torch.tensor(beta)}

    # -- driving the loop -------------------------------------------------------------------------------------
    def advance(self, optimizer: Optional[torch.optim.Optimizer], budget: float = math.inf,
                backward: Optional[Callable[[torch.Tensor], None]] = None, log: Optional[LogFn] = None,
                log_every: int = 1,
                on_stage: Optional[Callable[[Stage, Optional[dict]], None]] = None) -> Optional[dict]:
        """Run up to ``budget`` iterations (a stage without reconstruction counts one) and return the last one's
        loss terms (None if none ran). The one loop behind :meth:`run` and the Lightning training step.

        ``log(module name, iteration, loss terms as floats)`` is called every ``log_every`` iterations and at a
        stage's last (reading the terms waits for the device); ``on_stage(stage, its last loss terms)`` after
        each finished stage.
        """
        last = None
        while budget > 0 and not self.done:
            if not self._stage_ready:
                self.prepare_stage()
            if self.stage_complete():
                stage = self.finish_stage(optimizer)
                if on_stage is not None:
                    on_stage(stage, self.last_terms)
                budget -= 0 if self.config.reconstruct else 1
                self.last_terms = None
                continue
            self.last_terms = last = self.step(optimizer, backward)
            budget -= 1
            if log is not None and (self.iteration % log_every == 0 or self.stage_complete()):
                log(self.current.name, self.iteration, {k: float(v) for k, v in last.items()})
        return last

    def run(self, log: Optional[LogFn] = None, log_every: int = 1,
            on_stage: Optional[Callable[[Stage, Optional[dict]], None]] = None) -> None:
        """Every stage to the end, in this process (the Lightning module runs the same loop as training steps)."""
        self.advance(make_optimizer(self.model, self.config) if self.config.reconstruct else None,
                     log=log, log_every=log_every, on_stage=on_stage)
