"""The held-out images and the safeguard."""

from __future__ import annotations

import torch

from adfq_lightning import prepare, quantize
from adfq_lightning.reconstruction import Reconstructor, make_optimizer
from quantized_helpers import ASMO, reconstruct


def test_holdout_split_is_disjoint_deterministic_and_never_drawn(tiny_vit, more_images):
    from adfq_lightning.reconstruction.heldout import holdout_split

    held, update = holdout_split(40, 0.1, seed=3)
    assert len(held) == 4 and len(update) == 36 and not set(held.tolist()) & set(update.tolist())
    assert torch.equal(held, holdout_split(40, 0.1, seed=3)[0]) and not torch.equal(held, holdout_split(40, 0.1, 4)[0])
    everything = holdout_split(3, 0.1, seed=0)  # too few images to keep any aside: both are everything
    assert torch.equal(everything[0], torch.arange(3)) and torch.equal(everything[1], torch.arange(3))

    config = ASMO.replace(iters=6, batch_size=8, holdout=0.25)
    prepare(tiny_vit, config)
    rec = Reconstructor(tiny_vit, config, more_images[:16], torch.arange(16), 16)
    drawn = []
    optimizer = make_optimizer(tiny_vit, config)
    rec.prepare_stage()
    for it in range(config.iters):
        seed = config.seed * 1_000_003 + rec.stage * 100_003 + it
        draw = torch.randint(0, len(rec.update_ids), (config.batch_size,), generator=torch.Generator().manual_seed(seed))
        drawn += rec.update_ids[draw].tolist()
        rec.step(optimizer)
    assert len(rec.heldout_ids) == 4 and not set(drawn) & set(rec.heldout_ids.tolist())


def test_safeguard_reverts_a_module_made_worse_to_its_initial_state(make_tiny, more_images):
    # an absurd step-size learning rate makes reconstruction harmful: the safeguard must put every module back
    # (without bias correction, which would move a reverted module on)
    config = ASMO.replace(iters=10, batch_size=8, scale_lr=10.0, rounding_lr=1.0, bias_correction=False)
    guarded = reconstruct(make_tiny("vit"), more_images[:16], config)
    nearest = quantize(make_tiny("vit"), more_images[:16], config.replace(reconstruct=False))
    reverted = [s for s in guarded.stages if s.stats["reverted"]]
    assert reverted, [s.stats for s in guarded.stages]
    for stage in reverted:
        assert stage.stats["reconstructed_error"] > stage.stats["init_error"] == stage.stats["final_error"]
    # with every module reverted the model is exactly the no-reconstruction one
    if len(reverted) == len(guarded.stages):
        state, expected = guarded.model.state_dict(), nearest.state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    unguarded = reconstruct(make_tiny("vit"), more_images[:16], config.replace(safeguard=False))
    assert not any(s.stats["reverted"] for s in unguarded.stages)


def test_safeguard_decision_survives_a_resume(make_tiny, more_images):
    from adfq_lightning.reconstruction import make_optimizer

    config = ASMO.replace(iters=4, batch_size=8, scale_lr=10.0, rounding_lr=1.0)
    model = prepare(make_tiny("vit"), config)
    rec = Reconstructor(model, config, more_images[:16], torch.arange(16), 16)
    optimizer = make_optimizer(model, config)
    rec.prepare_stage()
    rec.step(optimizer)
    rec.step(optimizer)
    state = rec.state_dict()  # what a checkpoint holds mid-module: the initial state comes with it
    assert state["initial_state"] and all(k.endswith(("alpha", "scale", "delta")) for k in state["initial_state"])
    resumed = Reconstructor(model, config, more_images[:16], torch.arange(16), 16)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed._initial_state[k], v) for k, v in state["initial_state"].items())
