"""Each module's schedule position, and the adaptive budget: a module may stop early, with every schedule run to
its end."""

from __future__ import annotations

import math

import pytest
import torch

from adfq_lightning import prepare
from adfq_lightning.quantization_report import build_report, summarize
from adfq_lightning.quantizers import AdaRoundQuantizer
from adfq_lightning.reconstruction import Reconstructor, make_optimizer
from adfq_lightning.reconstruction.schedule import SHORT, StageBudget
from quantized_helpers import ASMO, reconstruct


def test_a_fixed_budget_is_the_iteration_count():
    budget = StageBudget(100)
    assert [budget.position(i) for i in (0, 7, 100)] == [0, 7, 100] and budget.end == 100 and budget.rate == 1.0
    assert budget.crossed(80, 80) and not budget.crossed(81, 80)


def test_a_plateau_runs_the_rest_of_the_schedule_whole_in_fewer_iterations():
    budget = StageBudget(1000)
    budget.observe(50, 1.0)
    budget.observe(100, 0.9)  # fell by 10 %: still falling
    assert budget.switch is None
    budget.observe(150, 0.896)  # fell by 0.4 %: it stopped
    assert budget.switch == 150 and budget.end == 150 + math.ceil(0.85 * SHORT * 1000)
    positions = [budget.position(i) for i in range(budget.end + 1)]
    assert positions[150] == 150 and positions[-1] == 1000  # the schedule ends where a full budget ends
    assert all(a < b for a, b in zip(positions, positions[1:]))
    assert budget.rate == pytest.approx(850 / 170)
    assert not budget.check_due(200, warmup_end=200)  # decided once
    assert StageBudget(1000, **budget.state_dict()) == budget  # what a checkpoint restores


def test_checks_run_only_during_the_warm_up():
    budget = StageBudget(1000)
    assert [i for i in range(0, 400) if budget.check_due(i, warmup_end=200)] == [50, 100, 150]


def test_adaptive_reconstruction_stops_early_with_every_module_hardened(make_tiny, more_images):
    config = ASMO.replace(iters=60, warmup=0.5, adaptive_iters=True)
    rec = reconstruct(make_tiny("vit"), more_images, config)
    used = [s.stats["iters"] for s in rec.stages]
    assert all(n <= 60 for n in used) and any(n < 60 for n in used), used
    for s in rec.stages:
        assert ("adaptive_switch" in s.stats) == (s.stats["iters"] < 60)
        assert not any(q.soft for q in s.module.modules() if isinstance(q, AdaRoundQuantizer))
    summary = summarize(build_report(config, rec.stages, "tiny"), "here")
    assert f"adaptive: {sum(used)} of {60 * len(used)} iterations" in summary


def test_adaptive_budget_survives_a_resume(make_tiny, more_images):
    config = ASMO.replace(iters=60, warmup=0.5, adaptive_iters=True, scale_lr=1e-2)
    model = prepare(make_tiny("vit"), config)
    rec = Reconstructor(model, config, more_images, torch.arange(len(more_images)), len(more_images))
    optimizer = make_optimizer(model, config)
    while rec.budget.switch is None and not rec.done:
        rec.advance(optimizer, budget=1)
    assert rec.budget.switch is not None, "no module stopped falling"
    resumed = Reconstructor(model, config, more_images, torch.arange(len(more_images)), len(more_images))
    resumed.load_state_dict(rec.state_dict())
    assert resumed.budget == rec.budget and resumed.stage_complete() == rec.stage_complete()
