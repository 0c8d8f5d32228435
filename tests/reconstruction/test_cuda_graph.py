"""The CUDA-graph path, exercised on a CPU with a capture that keeps the module eager."""

from __future__ import annotations

import pytest
import torch

from adfq_lightning import prepare
from adfq_lightning.quantizers import (
    AdaRoundQuantizer,
)
from adfq_lightning.reconstruction import Reconstructor
from quantized_helpers import ASMO, reconstruct


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_graph_path_captures_once_per_phase_and_matches_eager(make_tiny, more_images, monkeypatch, arch):
    """The CUDA-graph path on a CPU, with a capture that keeps the module eager: the engine captures each stage
    at its first soft and first hard iteration, with the iteration's batch shape, and the graph's call
    (keyword arguments fixed, attention scores returned for the KL term) gives exactly the eager result."""
    from adfq_lightning.reconstruction import cuda_graph

    captures = []

    def eager_capture(module, sample_args, allow_unused_input):
        target = module.target
        captures.append((target, [q.soft for q in target.modules() if isinstance(q, AdaRoundQuantizer)],
                         sample_args[0].shape, all(p.grad is not None for p in target.parameters() if p.requires_grad)))
        return module

    graph_target = cuda_graph.graph_target
    monkeypatch.setattr(cuda_graph, "graph_target", lambda *args: graph_target(*args, capture=eager_capture))
    config = ASMO.replace(iters=6, batch_size=4, harden_at=0.5)
    eager = reconstruct(make_tiny(arch), more_images[:8], config)
    model = prepare(make_tiny(arch), config)
    graphed = Reconstructor(model, config, more_images[:8], torch.arange(8), 8)
    graphed.graphs.enabled = True  # what a CUDA device sets
    graphed.run()
    assert [c[0] for c in captures] == [s.module for s in graphed.stages for _ in range(2)]
    assert all(soft == [True] * len(soft) for _, soft, _, _ in captures[::2])
    assert all(soft == [False] * len(soft) for _, soft, _, _ in captures[1::2])
    assert all(shape[0] % config.batch_size == 0 for _, _, shape, _ in captures)
    assert all(allocated for *_, allocated in captures)  # gradients are accumulated into, never aliased
    for a, b in zip(eager.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_graph_capture_failure_warns_and_goes_on_eagerly(make_tiny, more_images, monkeypatch):
    from adfq_lightning.reconstruction import cuda_graph

    attempts = []

    def failing_capture(*args):
        attempts.append(args[0])
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph, "graph_target", failing_capture)
    config = ASMO.replace(iters=3, batch_size=4)
    eager = reconstruct(make_tiny("vit"), more_images[:8], config)
    model = prepare(make_tiny("vit"), config)
    rec = Reconstructor(model, config, more_images[:8], torch.arange(8), 8)
    rec.graphs.enabled = True  # what a CUDA device sets
    with pytest.warns(UserWarning, match="CUDA graph capture of patch_embed.proj failed .*cuda_graphs=False"):
        rec.run()
    assert len(attempts) == 1  # not tried again for every module
    for a, b in zip(eager.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
