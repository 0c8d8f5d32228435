"""Reconstruction with compiled targets (``torch_compile``): the choice, the result, and the fallback."""

from __future__ import annotations

import pytest
import torch

from adfq_lightning import ADFQConfig, prepare
from adfq_lightning.reconstruction import Reconstructor
from adfq_lightning.reconstruction import compiled
from quantized_helpers import ASMO, reconstruct

@pytest.mark.slow
def test_compiled_reconstruction_agrees_with_eager_and_keeps_the_attention_term(make_tiny, more_images):
    """Fused kernels round differently, so the result is close, not bit-identical; the KL term on the attention
    scores must still be there (the compiled call returns the scores)."""
    config = ASMO.replace(iters=8, batch_size=8, holdout=0.0, bias_correction=False)
    eager = reconstruct(make_tiny("vit"), more_images[:16], config)
    model = prepare(make_tiny("vit"), config.replace(torch_compile=True))
    rec = Reconstructor(model, config.replace(torch_compile=True), more_images[:16], torch.arange(16), 16)
    kl = []
    rec.run(log=lambda name, it, terms: kl.append((name, terms["kl"])))
    assert any(name.endswith("attn") and value > 0 for name, value in kl)
    for (name, a), b in zip(eager.model.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4), name
    for a, b in zip(eager.stages, rec.stages):
        assert a.stats["final_error"] == pytest.approx(b.stats["final_error"], rel=1e-3)


def test_a_failed_compilation_warns_once_and_goes_on_eagerly(make_tiny, more_images, monkeypatch):
    attempts = []

    def failing_compile(module, **kwargs):
        def call(*args, **kw):
            attempts.append(module)
            raise RuntimeError("backend compiler failed")
        return call

    monkeypatch.setattr(compiled.torch, "compile", failing_compile)
    config = ASMO.replace(iters=3, batch_size=4, torch_compile=True)
    eager = reconstruct(make_tiny("vit"), more_images[:8], config.replace(torch_compile=False))
    model = prepare(make_tiny("vit"), config)
    with pytest.warns(UserWarning, match="torch.compile of patch_embed.proj failed .*torch_compile=False"):
        Reconstructor(model, config, more_images[:8], torch.arange(8), 8).run()
    assert len(attempts) == 1  # not tried again for every module
    for a, b in zip(eager.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_compilation_is_asked_for_and_leaves_a_cuda_graph_run_alone(make_tiny, more_images):
    config = ASMO.replace(iters=2, batch_size=4)
    assert ADFQConfig().torch_compile is False
    on = Reconstructor(prepare(make_tiny("vit"), config), config.replace(torch_compile=True), more_images[:8],
                       torch.arange(8), 8)
    assert on.compiled.enabled and not on.graphs.enabled
    off = Reconstructor(prepare(make_tiny("vit"), config), config, more_images[:8], torch.arange(8), 8)
    assert not off.compiled.enabled
