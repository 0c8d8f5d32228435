"""ASMO's stage loop: errors fall, rounding hardens, every stage runs, schedules act where they should."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from adfq_lightning import ADFQConfig, prepare, quantize, set_quantization
from adfq_lightning.quantizers import (
    AdaRoundQuantizer,
    ShiftLog2Quantizer,
    UniformQuantizer,
    outermost_quantizers,
)
from quantized_helpers import ASMO, quantizers, reconstruct, run


@pytest.fixture(scope="module")
def asmo_vit(make_tiny):
    """A tiny ViT after full ASMO (default method settings, 200 iterations per module), run once per module.

    No image is held out: the errors are in-sample, what reconstruction minimises (a random tiny network on 16
    random images has nothing to generalise; the held-out safeguard is tested on its own)."""
    config = ASMO.replace(iters=200, holdout=0.0)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = prepare(make_tiny("vit"), config)
    grids = {n: (q.grid.scale.clone(), q.grid.zero_point.clone())
             for n, q in quantizers(model, AdaRoundQuantizer).items()}
    rec = reconstruct(model, images, config)
    return model, rec, grids, images, config


def test_asmo_stage_stats(asmo_vit):
    model, rec, _, _, config = asmo_vit
    names = [s.name for s in rec.stages]
    assert names == ["patch_embed.proj", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "head"]
    for stage in rec.stages:
        for key in ("init_error", "final_error", "iters", "outlier_ratio", "cache_mb", "seconds"):
            assert key in stage.stats, (stage.name, key)
        assert stage.stats["iters"] == config.iters
        assert math.isfinite(stage.stats["init_error"]) and stage.stats["init_error"] > 0
        assert math.isfinite(stage.stats["final_error"]) and stage.stats["final_error"] > 0
    assert set(rec.stages[1].stats["outlier_ratio"]) == {"blocks.0.attn.qkv.qkv_input"}
    assert rec.done


def test_asmo_lowers_module_output_error_and_never_raises_it(asmo_vit):
    _, rec, _, _, _ = asmo_vit
    ratios = [s.stats["final_error"] / s.stats["init_error"] for s in rec.stages]
    assert all(r <= 1.0 for r in ratios), ratios  # the safeguard reverts a module that got worse
    assert math.exp(sum(math.log(r) for r in ratios) / len(ratios)) < 0.95, ratios
    for s in rec.stages:
        assert s.stats["reverted"] == (s.stats["reconstructed_error"] > s.stats["init_error"]), s.name
        kept = s.stats["init_error"] if s.stats["reverted"] else s.stats["reconstructed_error"]
        if s.stats.get("bias_corrected"):  # the default's bias correction, kept only where it lowered that
            assert s.stats["bias_corrected_error"] < kept
            kept = s.stats["bias_corrected_error"]
        assert s.stats["final_error"] == kept, s.name


def test_asmo_hardens_rounding_and_freezes_weight_grid(asmo_vit):
    model, _, grids, images, _ = asmo_vit
    for name, q in quantizers(model, AdaRoundQuantizer).items():
        assert not q.soft
        r = q.rounding()
        assert ((r == 0) | (r == 1)).all(), name
        # the weight grid is searched once and frozen: reconstruction learns rounding, not the weight scale
        assert torch.equal(q.grid.scale, grids[name][0]), name
        assert torch.equal(q.grid.zero_point, grids[name][1]), name
    # every quantizer is on and the model runs
    assert all(q.enabled for q in quantizers(model).values())
    assert torch.isfinite(run(model, images)).all()


def test_asmo_learns_rounding_away_from_nearest(asmo_vit, make_tiny):
    model, _, _, images, config = asmo_vit
    nearest = quantize(make_tiny("vit"), images, config.replace(reconstruct=False))
    changed = 0
    for name, q in quantizers(model, AdaRoundQuantizer).items():
        changed += int((q.rounding() != nearest.get_submodule(name).rounding()).sum())
    assert changed > 0


def test_asmo_without_reconstruction_keeps_init_error(tiny_vit, more_images):
    # (bias correction, ADFQ's default, may lower it: its own test is below)
    rec = reconstruct(tiny_vit, more_images[:16], ASMO.replace(reconstruct=False, bias_correction=False))
    for stage in rec.stages:
        assert stage.stats["final_error"] == pytest.approx(stage.stats["init_error"], rel=1e-6)
        assert stage.stats["iters"] == 0


def test_asmo_same_seed_same_model(make_tiny, more_images):
    states = []
    for _ in range(2):
        model = quantize(make_tiny("vit"), more_images[:16], ASMO)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    other = quantize(make_tiny("vit"), more_images[:16], ASMO.replace(seed=1)).state_dict()
    assert any(not torch.equal(other[k], states[0][k]) for k in other if k.endswith("alpha"))


def test_asmo_on_swin_and_deit_runs(make_tiny, more_images):
    for arch in ("swin", "deit"):
        model = make_tiny(arch)
        reference = copy.deepcopy(model)
        rec = reconstruct(model, more_images[:8], ASMO.replace(iters=5, batch_size=4))
        names = [s.name for s in rec.stages]
        if arch == "swin":
            assert "layers.1.downsample.reduction" in names and "layers.0.blocks.1.attn" in names
        else:
            assert names[-2:] == ["head", "head_dist"]
        out = run(model, more_images[:4])
        assert torch.isfinite(out).all()
        set_quantization(model, False)
        assert torch.allclose(run(model, more_images[:4]), run(reference, more_images[:4]), atol=1e-5)


def test_quantize_log_callback(tiny_vit, more_images):
    calls = []
    quantize(tiny_vit, more_images[:8], ASMO.replace(iters=3), log=lambda *a: calls.append(a))
    assert len(calls) == 6 * 3
    name, iteration, terms = calls[0]
    assert name == "patch_embed.proj" and iteration == 1
    assert set(terms) >= {"rec", "kl", "round", "beta"}
    attn_terms = [t for n, _, t in calls if n.endswith("attn")]
    assert all(t["kl"] >= 0 for t in attn_terms) and any(t["kl"] > 0 for t in attn_terms)


# -- reconstruction: held-out split, safeguard, gradient routing, hardening ---------------------------------------------


@pytest.mark.parametrize("mode", ["ste", "in_range", "none"])
def test_gradient_routing_through_log_and_uniform_quantizers(mode):
    x0 = torch.nn.functional.gelu(torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 2)
    log_q = ShiftLog2Quantizer(3, grad=mode)
    log_q.calibrate(x0)
    x = torch.cat([x0[:100], torch.tensor([100.0])]).requires_grad_(True)  # 100: far above the top level
    log_q(x).sum().backward()
    y = x.detach() + log_q.shift
    k = (-(y / log_q.delta.detach()).log2() * 2).round()
    flushed, clipped = k >= 8, k < 0
    assert flushed.any() and clipped[-1]
    if mode == "ste":
        assert torch.equal(x.grad, torch.ones_like(x))
    elif mode == "in_range":
        assert (x.grad[flushed | clipped] == 0).all() and (x.grad[~(flushed | clipped)] == 1).all()
    else:
        assert x.grad is None  # no path from the loss to the input at all
    assert log_q.delta.grad is not None and log_q.delta.grad.abs() > 0  # the step size learns in every mode

    uni = UniformQuantizer(3, grad=mode)
    uni.calibrate(torch.randn(500))
    z = torch.randn(50, requires_grad=True)
    (uni(z) * torch.rand(50, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert z.grad is None if mode == "none" else z.grad.abs().sum() > 0
    assert uni.scale.grad.abs() > 0


def test_reference_learns_only_linear_input_steps(tiny_vit):
    from adfq_lightning.reconstruction.learnable import learnable_parameters

    prepare(tiny_vit, ADFQConfig(learn_steps="linear_inputs"))
    attn = tiny_vit.blocks[0].attn
    _, steps = learnable_parameters(attn, "linear_inputs")
    _, every = learnable_parameters(attn, "all")
    owners = {id(p): q.role for q in outermost_quantizers(attn) for p in q.candidate_step_sizes()}
    assert {owners[id(p)] for p in steps} == {"qkv_input", "proj_input"}
    assert {owners[id(p)] for p in every} == {"qkv_input", "proj_input", "q", "k", "v", "attn_probs"}


def test_harden_at_fixes_rounding_then_learns_steps_only(tiny_vit, more_images):
    config = ASMO.replace(iters=10, batch_size=8, harden_at=0.5)
    rec = reconstruct(tiny_vit, more_images[:16], config)
    assert all(0.0 <= s.stats["undecided"] <= 1.0 for s in rec.stages)
    assert all(not q.soft for q in quantizers(tiny_vit, AdaRoundQuantizer).values())
    with pytest.raises(ValueError, match="harden_at"):
        ADFQConfig(harden_at=0.0)


def test_qdrop_until_mixes_the_fp_prefix_only_in_the_first_part_of_each_module(make_tiny, more_images):
    def losses(**changes):
        calls = []
        quantize(make_tiny("vit"), more_images[:16], ASMO.replace(iters=6, batch_size=8, **changes),
                 log=lambda name, it, terms: calls.append((name, it, float(terms["rec"]))))
        return calls

    mixed, until_half, never = losses(), losses(qdrop_until=0.5), losses(qdrop_prob=1.0)
    assert losses(qdrop_until=0.0) == never  # no QDrop iteration at all: exactly the run without it
    # the second module: the first one's input (the images) has no quantized prefix to mix with
    assert until_half[:6] == mixed[:6] == never[:6] and until_half[6][0] == "blocks.0.attn"
    assert until_half[6:9] == mixed[6:9] != never[6:9]  # the same draws while it mixes
    assert until_half[9] != mixed[9] and until_half != never
    with pytest.raises(ValueError, match="qdrop_until"):
        ADFQConfig(qdrop_until=1.5)


def test_half_precision_cache_halves_the_cache(make_tiny, more_images):
    # the reference's small rounding rate: two iterations at the budget-scaled 0.1 amplify the cache's rounding
    # (without bias correction: whether it is kept is a yes/no that a small error change can flip)
    config = ASMO.replace(iters=2, rounding_lr=3e-3, bias_correction=False)
    full = reconstruct(make_tiny("vit"), more_images[:16], config)
    half = reconstruct(make_tiny("vit"), more_images[:16], config.replace(cache_dtype="bfloat16"))
    for a, b in zip(full.stages, half.stages):
        assert b.stats["cache_mb"] == pytest.approx(a.stats["cache_mb"] / 2)
        assert b.stats["final_error"] == pytest.approx(a.stats["final_error"], rel=0.2)


# -- bias correction ------------------------------------------------------------------------------------------------
