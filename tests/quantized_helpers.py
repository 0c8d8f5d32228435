"""Small helpers the core tests share: a config without reconstruction, a short ASMO config, and shortcuts."""

from __future__ import annotations

import torch

from adfq_lightning import ADFQConfig, prepare
from adfq_lightning.quantizers import Quantizer
from adfq_lightning.reconstruction import Reconstructor

FAST = ADFQConfig(reconstruct=False)
ASMO = ADFQConfig(iters=30, batch_size=8, seed=0)


@torch.no_grad()
def run(model, x):
    return model(x)


def quantizers(model, cls=Quantizer):
    return {n: q for n, q in model.named_modules() if isinstance(q, cls)}


def reconstruct(model, images, config):
    """Prepare ``model`` and run every reconstruction stage on ``images``; the Reconstructor, for its stats."""
    prepare(model, config)
    rec = Reconstructor(model, config, images, torch.arange(len(images)), len(images))
    rec.run()
    return rec
