"""Quantized timm modules: float equivalence, quantized accuracy, checkpoints, switching, registry, attention."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.swin_transformer import PatchMerging, WindowAttention
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

import adfq_lightning
from adfq_lightning import ADFQConfig, load_quantized, prepare, quantize, save_quantized, set_quantization
from adfq_lightning.modules import (
    QUANTIZED_MODULES,
    QuantAttention,
    QuantConv2d,
    QuantLinear,
    QuantMlp,
    QuantWindowAttention,
    UnsupportedModuleError,
    activation_quantizer,
    is_quantized,
)
from adfq_lightning.quantizers import Quantizer, UniformQuantizer

W8A8 = ADFQConfig(w_bits=8, a_bits=8, reconstruct=False)
W4A4 = ADFQConfig(w_bits=4, a_bits=4, reconstruct=False)


@torch.no_grad()
def run(model, x):
    return model(x)


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_tiny_swin_has_shifted_block_and_patch_merging(tiny_swin):
    blocks = [b for stage in tiny_swin.layers for b in stage.blocks]
    assert any(any(b.shift_size) for b in blocks), "no shifted-window block"
    assert any(b.attn_mask is not None for b in blocks)
    assert any(isinstance(stage.downsample, PatchMerging) for stage in tiny_swin.layers)


def test_prepare_swaps_every_supported_module(tiny_model, arch):
    prepare(tiny_model, ADFQConfig())
    kinds = {type(m) for m in tiny_model.modules()}
    assert {QuantConv2d, QuantLinear, QuantMlp} <= kinds
    assert (QuantWindowAttention if arch == "swin" else QuantAttention) in kinds
    # nothing registered is left in float
    assert not any(type(m) in QUANTIZED_MODULES for m in tiny_model.modules())
    assert not any(isinstance(m, (Attention, WindowAttention)) for m in tiny_model.modules())


def test_quantization_off_equals_float_model(tiny_model, images):
    reference = copy.deepcopy(tiny_model)
    prepare(tiny_model, ADFQConfig())
    set_quantization(tiny_model, False)
    out, ref = run(tiny_model, images), run(reference, images)
    assert out.shape == ref.shape == (images.shape[0], 10)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_w8a8_close_to_float(tiny_model, images, more_images):
    reference = copy.deepcopy(tiny_model)
    quantize(tiny_model, images, W8A8)
    out, ref = run(tiny_model, more_images), run(reference, more_images)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # it is quantized
    # log quantizers (softmax, post-GELU) have a bits-independent relative step of 2**(1/2): the full method
    # is looser than a uniform W8A8, which must be close.
    assert rel_error(out, ref) < 0.35
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.6


def test_w8a8_uniform_activations_are_accurate(tiny_model, images, more_images):
    reference = copy.deepcopy(tiny_model)
    quantize(tiny_model, more_images, W8A8.replace(slq=False, log_softmax=False))
    for x in (more_images, images):  # the calibration images and unseen ones
        out, ref = run(tiny_model, x), run(reference, x)
        assert rel_error(out, ref) < 0.04
        assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.75  # random weights: near-tied logits


def test_w4a4_outputs_finite_and_worse_than_w8a8(tiny_model, make_tiny, arch, images, more_images):
    reference = copy.deepcopy(tiny_model)
    quantize(tiny_model, images, W4A4.replace(slq=False, log_softmax=False))
    w8 = quantize(make_tiny(arch), images, W8A8.replace(slq=False, log_softmax=False))
    ref = run(reference, more_images)
    out4, out8 = run(tiny_model, more_images), run(w8, more_images)
    assert torch.isfinite(out4).all()
    assert rel_error(out4, ref) > rel_error(out8, ref)
    full = quantize(make_tiny(arch), images, W4A4)
    assert torch.isfinite(run(full, more_images)).all()


def test_state_dict_round_trip(tiny_model, make_tiny, arch, images, more_images):
    quantize(tiny_model, images, W4A4)
    expected = run(tiny_model, more_images)
    state = tiny_model.state_dict()

    fresh = prepare(make_tiny(arch, seed=123), W4A4)  # other float weights, uncalibrated quantizers
    with pytest.raises(RuntimeError, match="not calibrated"):
        run(fresh, more_images)
    fresh.load_state_dict(state)
    assert torch.equal(run(fresh, more_images), expected)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_save_and_load_quantized(tiny_model, make_tiny, arch, images, more_images, tmp_path):
    config = W4A4.replace(w_bits=3, overrides={"head*": {"w_bits": 6}}, bias_correction=True)
    quantize(tiny_model, images, config)
    expected = run(tiny_model, more_images)
    assert any(k.endswith("bias_correction") for k in tiny_model.state_dict())  # travels with the file
    path = tmp_path / "sub" / "q.pt"
    save_quantized(tiny_model, path, config)

    blob = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and containers only
    assert blob["format"] == "adfq-lightning/1"
    assert blob["config"]["w_bits"] == 3

    loaded = load_quantized(make_tiny(arch, seed=7), path)
    assert torch.equal(run(loaded, more_images), expected)
    assert not loaded.training
    head_q = loaded.get_submodule("head.fc" if arch == "swin" else "head").weight_quantizer
    assert head_q.bits == 6  # the saved config, not a default, rebuilt the quantizers


def test_load_quantized_rejects_other_model(tiny_vit, tiny_swin, images, tmp_path):
    quantize(tiny_vit, images, W8A8)
    path = tmp_path / "vit.pt"
    save_quantized(tiny_vit, path, W8A8)
    with pytest.raises(ValueError, match="VisionTransformer, not a SwinTransformer"):
        load_quantized(tiny_swin, path)
    with pytest.raises(ValueError, match="does not match this model"):
        load_quantized(vit_of_depth(3), path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an adfq-lightning quantized model file"):
        load_quantized(tiny_swin, tmp_path / "other.pt")


def vit_of_depth(depth):
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=10).eval()


def test_save_quantized_needs_quantized_model(tiny_vit, tmp_path):
    with pytest.raises(ValueError, match="run quantize"):
        save_quantized(tiny_vit, tmp_path / "x.pt", W8A8)
    assert not (tmp_path / "x.pt").exists()


def test_switch_quantization_off_and_on(tiny_model, images, more_images):
    reference = copy.deepcopy(tiny_model)
    quantize(tiny_model, images, W4A4)
    quantized = run(tiny_model, more_images)
    floating = run(reference, more_images)
    for _ in range(2):
        set_quantization(tiny_model, False)
        assert torch.allclose(run(tiny_model, more_images), floating, atol=1e-5, rtol=1e-4)
        set_quantization(tiny_model, True)
        assert torch.equal(run(tiny_model, more_images), quantized)


def test_quantized_model_forward_is_deterministic_and_batch_independent(tiny_model, images, more_images):
    quantize(tiny_model, images, W4A4)
    full = run(tiny_model, more_images)
    halves = torch.cat([run(tiny_model, more_images[:16]), run(tiny_model, more_images[16:])])
    assert torch.allclose(full, halves, atol=1e-5)  # static quantization: no per-batch statistics


# -- registry -------------------------------------------------------------------------------------------------------
class Gain(nn.Module):
    """A custom float module: per-channel gain."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class QuantGain(nn.Module):
    created: list = []

    def __init__(self, gain: Gain, config: ADFQConfig, name: str) -> None:
        super().__init__()
        self.gamma = gain.gamma
        self.input_quantizer = activation_quantizer(config, name, "input")

    @classmethod
    def from_float(cls, module, config, name):
        cls.created.append(name)
        return cls(module, config, name)

    def forward(self, x):
        return self.input_quantizer(x) * self.gamma


@pytest.fixture
def registered_gain():
    adfq_lightning.register(Gain)(QuantGain)
    QuantGain.created = []
    yield
    del QUANTIZED_MODULES[Gain]


def test_register_custom_module(registered_gain, tiny_vit, images):
    tiny_vit.blocks[0].ls1 = Gain(32)  # the LayerScale slot of the first block
    tiny_vit.blocks[1].ls2 = Gain(32)
    gain = tiny_vit.blocks[0].ls1
    reference = copy.deepcopy(tiny_vit)
    quantize(tiny_vit, images, W8A8)
    assert QuantGain.created == ["blocks.0.ls1", "blocks.1.ls2"]
    quant = tiny_vit.blocks[0].ls1
    assert isinstance(quant, QuantGain) and is_quantized(quant)
    assert quant.gamma is gain.gamma
    assert isinstance(quant.input_quantizer, UniformQuantizer) and bool(quant.input_quantizer.calibrated)
    set_quantization(tiny_vit, False)
    assert torch.allclose(run(tiny_vit, images), run(reference, images), atol=1e-5)


def test_register_requires_from_float():
    class NoFactory(nn.Module):
        pass

    with pytest.raises(TypeError, match="from_float"):
        adfq_lightning.register(Gain)(NoFactory)
    assert Gain not in QUANTIZED_MODULES


# -- attention ------------------------------------------------------------------------------------------------------
def block_input(model, images):
    """The token input of the first attention: what the quantized attention is called with."""
    captured = {}
    attn = model.blocks[0].attn if hasattr(model, "blocks") else model.layers[0].blocks[1].attn
    handle = attn.register_forward_pre_hook(lambda m, args, kwargs: captured.update(args=args, kwargs=kwargs),
                                            with_kwargs=True)
    run(model, images)
    handle.remove()
    return attn, captured["args"][0], captured["kwargs"]


@pytest.mark.parametrize("quantized", [False, True])
def test_record_scores_exposes_pre_softmax_scores(tiny_model, arch, images, quantized):
    quantize(tiny_model, images, W4A4)
    set_quantization(tiny_model, quantized)
    attn, x, kwargs = block_input(tiny_model, images[:2])
    assert attn.scores is None
    plain = attn(x, **kwargs)
    attn.record_scores = True
    recorded = attn(x, **kwargs)
    assert torch.equal(plain, recorded)  # recording does not change the output
    heads, tokens = attn.num_heads, x.shape[1]
    assert attn.scores.shape == (x.shape[0], heads, tokens, tokens)
    if arch == "swin":
        assert kwargs["mask"] is not None  # the shifted block: scores include the window mask
        assert (attn.scores < -50).any()
    attn.record_scores = False
    attn(x, **kwargs)
    assert attn.scores is None


def test_recorded_scores_match_timm_attention(tiny_vit, images):
    reference = copy.deepcopy(tiny_vit.blocks[0].attn)
    prepare(tiny_vit, ADFQConfig())
    set_quantization(tiny_vit, False)
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(0))
    attn = tiny_vit.blocks[0].attn
    attn.record_scores = True
    attn(x)
    q, k, _ = reference.qkv(x).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    expected = (q * reference.scale) @ k.transpose(-2, -1)
    assert torch.allclose(attn.scores, expected, atol=1e-5)


def test_recorded_scores_match_timm_window_attention(tiny_swin, images):
    reference = copy.deepcopy(tiny_swin.layers[0].blocks[1].attn)
    prepare(tiny_swin, ADFQConfig())
    set_quantization(tiny_swin, False)
    attn, x, kwargs = block_input(tiny_swin, images[:2])
    mask = kwargs["mask"]
    attn.record_scores = True
    with torch.no_grad():
        attn(x, mask=mask)
        q, k, _ = reference.qkv(x).reshape(x.shape[0], x.shape[1], 3, reference.num_heads, -1).permute(2, 0, 3, 1, 4)
        expected = (q * reference.scale) @ k.transpose(-2, -1) + reference._get_rel_pos_bias()
        windows, n = mask.shape[0], x.shape[1]
        expected = (expected.view(-1, windows, reference.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0))
    assert torch.allclose(attn.scores, expected.view(-1, reference.num_heads, n, n), atol=1e-5)


def make_masks(batch, heads, tokens):
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(batch, 1, tokens, tokens, generator=g) > 0.3
    keep |= torch.eye(tokens, dtype=torch.bool)  # never a fully masked row
    additive = torch.zeros(batch, 1, tokens, tokens).masked_fill(~keep, float("-inf"))
    return keep, additive


def test_vit_attn_mask_matches_timm_when_quantization_off(tiny_vit, images):
    reference = copy.deepcopy(tiny_vit.blocks[0].attn)
    prepare(tiny_vit, ADFQConfig())
    set_quantization(tiny_vit, False)
    attn = tiny_vit.blocks[0].attn
    assert isinstance(attn, QuantAttention)
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(0))
    keep, additive = make_masks(2, 2, 17)
    with torch.no_grad():
        for kwargs in ({"attn_mask": keep}, {"attn_mask": additive}, {"is_causal": True}, {}):
            assert torch.allclose(attn(x, **kwargs), reference(x, **kwargs), atol=1e-5), kwargs
        # the mask matters
        assert not torch.allclose(attn(x, attn_mask=keep), attn(x), atol=1e-3)


def test_vit_attn_mask_applied_when_quantized(tiny_vit, images):
    quantize(tiny_vit, images, W4A4)
    attn = tiny_vit.blocks[0].attn
    _, x, _ = block_input(tiny_vit, images[:2])
    keep, _ = make_masks(2, 2, x.shape[1])
    with torch.no_grad():
        attn.record_scores = True
        masked = attn(x, attn_mask=keep)
        probs = attn.scores.softmax(-1)
        attn.record_scores = False
        assert torch.isfinite(masked).all()
        assert torch.equal(probs.masked_select(~keep.expand_as(probs)), torch.zeros(int((~keep).sum()) * 2))
        assert not torch.allclose(masked, attn(x), atol=1e-4)


def test_gated_attention_is_rejected(tiny_vit):
    tiny_vit.blocks[1].attn = Attention(32, num_heads=2, gated=True)
    with pytest.raises(UnsupportedModuleError, match=r"blocks\.1\.attn: gated"):
        prepare(tiny_vit, ADFQConfig())
    assert not any(is_quantized(m) for m in tiny_vit.modules())  # a failed conversion changes nothing


def test_quantizers_are_named_after_their_place(tiny_vit):
    prepare(tiny_vit, ADFQConfig())
    names = {n: q.name for n, q in tiny_vit.named_modules() if isinstance(q, Quantizer) and q.name}
    assert names["blocks.0.attn.qkv.input_quantizer"] == "blocks.0.attn.qkv.qkv_input"
    assert names["blocks.0.attn.matmul_av.a_quantizer"] == "blocks.0.attn.attn_probs"
    assert names["blocks.1.mlp.fc2.weight_quantizer"] == "blocks.1.mlp.fc2.weight"
