"""Empirical bias correction after each module."""

from __future__ import annotations

import copy

import torch

from adfq_lightning import quantize, set_quantization
from adfq_lightning.reconstruction import Reconstructor
from quantized_helpers import FAST, reconstruct, run


def test_bias_correction_moves_the_mean_output_to_the_float_models(make_tiny, more_images):
    from adfq_lightning.modules import QuantLinear
    from adfq_lightning.reconstruction.heldout import holdout_split

    config = FAST  # bias correction is ADFQ's default
    float_model = make_tiny("vit")
    rec = reconstruct(copy.deepcopy(float_model), more_images, config)
    model, stages = rec.model, {s.name: s for s in rec.stages}
    corrected = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.bias_correction is not None}
    assert corrected
    for stage in stages.values():
        kept = stage.stats.get("bias_corrected", False)  # no entry: no Linear with a bias (the patch embedding)
        assert kept == any(n == stage.name or n.startswith(stage.name + ".") for n in corrected), stage.name
        if kept:  # kept only where the held-out error fell, and the module's final error says so
            assert stage.stats["bias_corrected_error"] == stage.stats["final_error"] < stage.stats["init_error"]
    # the head's correction is computed last, on the quantized prefix: the mean logits over the images the
    # corrections were fitted on are the float model's
    assert stages["head"].stats["bias_corrected"]
    _, update = holdout_split(len(more_images), config.holdout, config.seed)
    quantized_mean, float_mean = run(model, more_images[update]).mean(0), run(float_model, more_images[update]).mean(0)
    assert torch.allclose(quantized_mean, float_mean, atol=1e-5)
    uncorrected = quantize(copy.deepcopy(float_model), more_images, FAST.replace(bias_correction=False))
    assert (quantized_mean - float_mean).abs().max() < 0.1 * (run(uncorrected, more_images[update]).mean(0)
                                                              - float_mean).abs().max()
    # switched off, it is the converted float model again, as without correction: the float bias is untouched
    set_quantization(model, False)
    set_quantization(uncorrected, False)
    assert torch.equal(run(model, more_images), run(uncorrected, more_images))


def test_bias_correction_is_dropped_where_it_does_not_lower_the_held_out_error(make_tiny, more_images, monkeypatch):
    from adfq_lightning.modules import QuantLinear

    # an output error that nothing lowers: every module must give its correction back
    monkeypatch.setattr(Reconstructor, "output_error", lambda self, ids=None: 1.0)
    rec = reconstruct(make_tiny("vit"), more_images[:16], FAST.replace(bias_correction=True, batch_size=16))
    assert all(s.stats["bias_corrected"] is False for s in rec.stages if "bias_corrected" in s.stats)
    assert all(m.bias_correction is None for m in rec.model.modules() if isinstance(m, QuantLinear))
    assert not any(k.endswith("bias_correction") for k in rec.model.state_dict())
