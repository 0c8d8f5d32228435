"""Shared fixtures: tiny timm ViT / DeiT / Swin models (random weights, eval mode, seeded) and a fixed image batch.

Every model fixture builds a fresh model, so a test may quantize it in place. Use ``make_tiny(arch)`` for a
second, identical copy of the same architecture (e.g. to load a checkpoint into), ``tiny_model`` for a test
that runs on all three architectures.
"""

from __future__ import annotations

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning OpenMP workers make
# every op many times slower.
torch.set_num_threads(1)

ARCHS = ("vit", "deit", "swin")
IMG_SIZE = 32
NUM_CLASSES = 10


def build_tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny timm model built from timm's own classes; the same ``(arch, seed)`` gives identical weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "vit":
            model = VisionTransformer(img_size=IMG_SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                      num_classes=NUM_CLASSES)
        elif arch == "deit":
            model = VisionTransformerDistilled(img_size=IMG_SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                               num_classes=NUM_CLASSES)
        elif arch == "swin":
            # 8x8 patches, window 4: stage 0 has a regular and a shifted-window block (shift 2 with a mask);
            # stage 1 starts with PatchMerging (8x8 -> 4x4).
            model = SwinTransformer(img_size=IMG_SIZE, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                                    num_heads=(2, 4), num_classes=NUM_CLASSES, drop_path_rate=0.0)
        else:
            raise ValueError(f"unknown tiny architecture {arch!r}: use one of {ARCHS}")
    return model.eval()


def make_images(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def make_tiny():
    """Factory: ``make_tiny("vit" | "deit" | "swin", seed=0)`` -> a fresh tiny model in eval mode."""
    return build_tiny


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    return build_tiny("vit")


@pytest.fixture
def tiny_deit() -> VisionTransformerDistilled:
    return build_tiny("deit")


@pytest.fixture
def tiny_swin() -> SwinTransformer:
    return build_tiny("swin")


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    """Parametrises a test over the three architectures."""
    return request.param


@pytest.fixture
def tiny_model(arch: str) -> torch.nn.Module:
    return build_tiny(arch)


@pytest.fixture
def images() -> torch.Tensor:
    """A fixed batch of 8 random images (3x32x32)."""
    return make_images(8)


@pytest.fixture
def more_images() -> torch.Tensor:
    """A fixed batch of 32 random images, independent of ``images``."""
    return make_images(32, seed=2)
