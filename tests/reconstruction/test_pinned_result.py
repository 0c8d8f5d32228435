"""The quantized state of a tiny ViT and a tiny Swin after ``quantize()`` is pinned bit for bit.

The reference files were written by this library with torch 2.14.1 on x86-64, one thread; a change that moves
any bit of the result (a reordered reduction, another random draw) fails here. Refactors must keep it; a change
of the method that means to move it writes the files again (``python tests/reconstruction/test_pinned_result.py``)
and says why in its commit.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adfq_lightning import ADFQConfig, quantize
from conftest import build_tiny, make_images

PINNED = Path(__file__).with_name("pinned")
TORCH = "2.14.1"
CONFIG = ADFQConfig(iters=12, batch_size=4, init_samples=8, seed=0)  # reconstruction, safeguard, bias correction


def quantized_state(arch: str) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_tiny(arch)
        quantize(model, make_images(16, seed=3), CONFIG)
    finally:
        torch.set_num_threads(threads)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.skipif(not torch.__version__.startswith(TORCH) or platform.machine() != "x86_64",
                    reason=f"the pinned states were made with torch {TORCH} on x86-64")
@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_quantized_state_is_bit_identical_to_the_pinned_one(arch):
    pinned, state = load_file(PINNED / f"{arch}.safetensors"), quantized_state(arch)
    assert set(state) == set(pinned)
    differ = [k for k in pinned if not torch.equal(pinned[k], state[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


if __name__ == "__main__":
    for arch in ("vit", "swin"):
        save_file(quantized_state(arch), PINNED / f"{arch}.safetensors", metadata={"torch": torch.__version__})
