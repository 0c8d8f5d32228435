"""quantize() and prepare(): calibration inputs, unsupported models and modules, bad input refused early."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

from adfq_lightning import UnsupportedModuleError, prepare, quantize
from adfq_lightning.data.calibration import collect_images
from adfq_lightning.modules import convert, is_quantized
from quantized_helpers import FAST, quantizers, run


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.ReLU()),
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10)),
    lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
])
def test_model_without_vision_transformer_is_rejected(make, images):
    model = make()
    for call in (lambda: quantize(model, images, FAST), lambda: prepare(model, FAST)):
        with pytest.raises(UnsupportedModuleError, match=r"is not a Vision Transformer.*timm VisionTransformer"):
            call()
    assert not any(is_quantized(m) for m in model.modules())  # rejected before any swap


def test_convert_without_supported_module_names_the_fix():
    with pytest.raises(UnsupportedModuleError, match=r"Sequential has no module .* adfq_lightning\.register"):
        convert(nn.Sequential(nn.ReLU(), nn.Tanh()), FAST)


def test_unsupported_error_is_a_type_error():
    assert issubclass(UnsupportedModuleError, TypeError)


@pytest.mark.parametrize("calib", [
    torch.empty(0, 3, 32, 32),
    torch.empty(0),
    [],
    (),
    iter([]),
    torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.empty(0, 3, 32, 32)), batch_size=4),
])
def test_empty_calibration_set(tiny_vit, calib):
    with pytest.raises(ValueError, match="calibration set is empty"):
        quantize(tiny_vit, calib, FAST)


@pytest.mark.parametrize("calib", [torch.randn(3, 32, 32), torch.tensor(1.0), torch.randn(2, 3, 32)])
def test_calibration_images_must_be_4d(tiny_vit, calib):
    with pytest.raises(ValueError, match=r"must be \(N, C, H, W\)"):
        quantize(tiny_vit, calib, FAST)


def test_calibration_batches_must_hold_tensors(tiny_vit):
    with pytest.raises(TypeError, match="tensors or \\(images, labels\\) pairs"):
        quantize(tiny_vit, [[[1, 2, 3]]], FAST)


def test_calibration_from_loader_equals_tensor(make_tiny, more_images):
    labels = torch.zeros(len(more_images), dtype=torch.long)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(more_images, labels), batch_size=5)
    assert torch.equal(collect_images(loader), more_images)
    assert torch.equal(collect_images(loader, limit=12), more_images[:12])
    a = quantize(make_tiny("vit"), loader, FAST)
    b = quantize(make_tiny("vit"), more_images, FAST)
    assert torch.equal(run(a, more_images[:4]), run(b, more_images[:4]))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_image_is_reported(tiny_vit, images, value):
    bad = images.clone()
    bad[3, 1, 5, 7] = value
    with pytest.raises(ValueError, match=r"calibration images contain NaN or Inf values"):
        quantize(tiny_vit, bad, FAST)
    assert not any(is_quantized(m) for m in tiny_vit.modules())  # refused before any module is swapped


def test_non_finite_linear_weight_is_reported(tiny_vit, images):
    with torch.no_grad():
        tiny_vit.blocks[1].mlp.fc1.weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight received NaN or Inf.*model weights"):
        quantize(tiny_vit, images, FAST)
    assert not any(is_quantized(m) for m in tiny_vit.modules())  # the float model is left as it was


def test_non_finite_norm_weight_is_reported_where_it_reaches_a_quantizer(tiny_vit, images):
    with torch.no_grad():
        tiny_vit.blocks[0].norm2.weight[0] = float("inf")
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.fc1_input received NaN or Inf"):
        quantize(tiny_vit, images, FAST)


class CrossAttention(nn.Module):
    """An attention variant the wrappers do not know: its q @ k^T would stay in float."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal=False) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj((q @ k.transpose(-2, -1)).softmax(-1) @ v)


class TalkingHeads(Attention):
    """A timm Attention subclass without 'attention' in its name: registration is by exact type."""


def _swap_attention(model, new):
    model.blocks[1].attn = new
    return model


@pytest.mark.parametrize("make, named", [
    (lambda: CrossAttention(32), r"blocks\.1\.attn \(test_api\.CrossAttention\)"),
    (lambda: TalkingHeads(32, num_heads=2), r"blocks\.1\.attn \(test_api\.TalkingHeads\)"),
])
def test_unsupported_attention_variant_is_named(tiny_vit, images, make, named):
    _swap_attention(tiny_vit, make())
    reference = copy.deepcopy(tiny_vit)
    with pytest.raises(UnsupportedModuleError, match=named + r".*adfq_lightning\.register\(<its class>\)"):
        quantize(tiny_vit, images, FAST)
    # nothing was swapped: the model still runs, in float, exactly as before
    assert not any(is_quantized(m) for m in tiny_vit.modules())
    assert torch.equal(run(tiny_vit, images), run(reference, images))


def test_other_timm_attention_is_named(images):
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10,
                              global_pool="map", class_token=False).eval()
    with pytest.raises(UnsupportedModuleError, match=r"attn_pool \(timm\.layers\.attention_pool\.AttentionPoolLatent\)"):
        quantize(model, images, FAST)


def test_other_timm_vision_transformer_family_is_rejected(images):
    model = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=1, num_heads=2, num_classes=10)
    with pytest.raises(UnsupportedModuleError, match="VisionTransformerRelPos is not a Vision Transformer"):
        quantize(model, images, FAST)


def test_quantize_under_inference_mode_is_refused(tiny_vit, images):
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inference_mode.*torch\.no_grad\(\) is fine"):
        quantize(tiny_vit, images, FAST)
    assert not any(is_quantized(m) for m in tiny_vit.modules())
    with torch.no_grad():  # allowed, reconstruction included
        quantize(tiny_vit, images, FAST.replace(reconstruct=True, iters=2, batch_size=4))
    assert all(bool(q.calibrated) for q in quantizers(tiny_vit).values() if not q.name.endswith(".weight"))


def test_uncalibrated_model_forward_is_refused(tiny_vit, images):
    prepare(tiny_vit, FAST)
    with pytest.raises(RuntimeError, match=r"patch_embed\.proj\.input is not calibrated: run adfq_lightning\.quantize"):
        run(tiny_vit, images)


def test_init_samples_limits_the_images_that_calibrate(make_tiny, more_images):
    grids_only = FAST.replace(bias_correction=False)  # bias correction fits on every image, by design
    first = quantize(make_tiny("vit"), more_images, grids_only.replace(init_samples=4)).state_dict()
    only = quantize(make_tiny("vit"), more_images[:4], grids_only).state_dict()
    every = quantize(make_tiny("vit"), more_images, grids_only).state_dict()
    for key in first:
        assert torch.allclose(first[key].float(), only[key].float(), rtol=1e-5, atol=1e-7), key
    scales = [k for k in first if k.endswith("input_quantizer.scale")]
    assert any(not torch.allclose(first[k], every[k]) for k in scales)


def test_quantize_is_in_place_and_idempotent_prepare(tiny_vit, images):
    out = quantize(tiny_vit, images, FAST)
    assert out is tiny_vit and not tiny_vit.training
    before = {n: type(m) for n, m in tiny_vit.named_modules()}
    prepare(tiny_vit, FAST)  # already converted: nothing changes
    assert {n: type(m) for n, m in tiny_vit.named_modules()} == before
