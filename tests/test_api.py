"""The public API: presets, per-layer bits, ablations, bad-input errors, and ASMO reconstruction."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

from adfq_lightning import ADFQConfig, UnsupportedModuleError, prepare, quantize, set_quantization
from adfq_lightning.data.calibration import collect_images
from adfq_lightning.modules import convert, is_quantized
from adfq_lightning.quantizers import (
    AdaRoundQuantizer,
    BestOfQuantizer,
    LogSqrt2Quantizer,
    PerPatchOutlierQuantizer,
    Quantizer,
    ShiftLog2Quantizer,
    UniformQuantizer,
    outermost_quantizers,
)
from adfq_lightning.reconstruction import Reconstructor
from adfq_lightning.reconstruction import make_optimizer

FAST = ADFQConfig(reconstruct=False)


@torch.no_grad()
def run(model, x):
    return model(x)


def quantizers(model, cls=Quantizer):
    return {n: q for n, q in model.named_modules() if isinstance(q, cls)}


# -- presets --------------------------------------------------------------------------------------------------------
def test_presets():
    assert ADFQConfig.preset("adfq") == ADFQConfig()
    assert ADFQConfig.preset("adfq").reconstruct
    init = ADFQConfig.preset("adfq_init")
    assert init.method == "adfq" and not init.reconstruct
    for name in ("minmax", "percentile"):
        cfg = ADFQConfig.preset(name)
        assert cfg.method == name and not cfg.reconstruct
    assert ADFQConfig.preset("minmax", w_bits=8, a_bits=6).a_bits == 6
    # bias correction by default for ADFQ, never for the baselines; an explicit choice wins
    assert init.corrects_biases and ADFQConfig().corrects_biases
    assert not any(ADFQConfig.preset(name).corrects_biases for name in ("minmax", "percentile"))
    assert ADFQConfig.preset("percentile", bias_correction=True).corrects_biases
    assert not init.replace(bias_correction=False).corrects_biases
    with pytest.raises(ValueError, match="unknown preset 'gptq'.*adfq_init"):
        ADFQConfig.preset("gptq")


@pytest.mark.parametrize("name", ["minmax", "percentile"])
def test_baseline_presets_use_per_tensor_uniform_everywhere(tiny_vit, images, name):
    quantize(tiny_vit, images, ADFQConfig.preset(name))
    acts = [q for q in quantizers(tiny_vit).values() if not isinstance(q, AdaRoundQuantizer) and q.name and
            not q.name.endswith(".weight")]
    assert acts and all(type(q) is UniformQuantizer and q.granularity == "tensor" and q.search == name for q in acts)
    weights = quantizers(tiny_vit, AdaRoundQuantizer).values()
    assert all(q.grid.granularity == "tensor" and q.grid.search == name for q in weights)
    assert torch.isfinite(run(tiny_vit, images)).all()


def test_adfq_preset_quantizer_table(tiny_vit):
    prepare(tiny_vit, ADFQConfig.preset("adfq_init", act_family="log"))  # the paper's table as it is
    attn, mlp = tiny_vit.blocks[0].attn, tiny_vit.blocks[0].mlp
    assert type(attn.qkv.input_quantizer) is PerPatchOutlierQuantizer
    assert type(mlp.fc1.input_quantizer) is PerPatchOutlierQuantizer
    assert type(mlp.fc2.input_quantizer) is ShiftLog2Quantizer
    assert type(attn.matmul_av.a_quantizer) is LogSqrt2Quantizer
    for q in (attn.proj.input_quantizer, attn.matmul_qk.a_quantizer, attn.matmul_qk.b_quantizer,
              attn.matmul_av.b_quantizer):
        assert type(q) is UniformQuantizer and q.search == "mse"
    assert attn.qkv.weight_quantizer.grid.granularity == "channel"


def test_baseline_is_worse_than_adfq_init_at_w4a4(make_tiny, images, more_images):
    reference = make_tiny("vit")
    errors = {}
    for preset in ("minmax", "adfq_init"):
        model = quantize(make_tiny("vit"), more_images, ADFQConfig.preset(preset, w_bits=4, a_bits=4))
        out, ref = run(model, images), run(reference, images)
        errors[preset] = ((out - ref).norm() / ref.norm()).item()
    assert errors["adfq_init"] < errors["minmax"]


# -- per-layer bits -------------------------------------------------------------------------------------------------
def bits_of(model, module_name):
    m = model.get_submodule(module_name)
    return m.weight_quantizer.bits, m.input_quantizer.bits


@pytest.mark.parametrize("arch, heads", [("vit", ["head"]), ("deit", ["head", "head_dist"]), ("swin", ["head.fc"])])
def test_patch_embed_and_head_default_to_8_bits(make_tiny, arch, heads):
    model = prepare(make_tiny(arch), ADFQConfig(w_bits=4, a_bits=3))
    assert bits_of(model, "patch_embed.proj") == (8, 8)
    for head in heads:
        assert bits_of(model, head) == (8, 8)
    first_block = "blocks.0" if arch != "swin" else "layers.0.blocks.0"
    assert bits_of(model, f"{first_block}.attn.qkv") == (4, 3)
    assert bits_of(model, f"{first_block}.mlp.fc2") == (4, 3)
    assert model.get_submodule(f"{first_block}.attn.matmul_av").a_quantizer.bits == 3


def test_override_pattern_changes_bits(tiny_vit):
    overrides = {**ADFQConfig().overrides, "blocks.1.*": {"w_bits": 6}, "blocks.1.mlp.fc2": {"a_bits": 5}}
    prepare(tiny_vit, ADFQConfig(overrides=overrides))
    assert bits_of(tiny_vit, "blocks.0.attn.qkv") == (4, 4)
    assert bits_of(tiny_vit, "blocks.1.attn.qkv") == (6, 4)
    assert bits_of(tiny_vit, "blocks.1.mlp.fc2") == (6, 5)  # both patterns apply; each sets its own key
    assert tiny_vit.blocks[1].attn.matmul_qk.a_quantizer.bits == 4
    assert bits_of(tiny_vit, "head") == (8, 8)


def test_last_matching_override_wins():
    cfg = ADFQConfig(overrides={"blocks.*": {"w_bits": 3}, "blocks.1.*": {"w_bits": 7}})
    assert cfg.bits_for("blocks.0.attn.qkv") == (3, 4)
    assert cfg.bits_for("blocks.1.attn.qkv") == (7, 4)
    assert cfg.bits_for("head") == (4, 4)  # overrides replace the defaults


@pytest.mark.parametrize("overrides, match", [
    ({"head": {"w_bits": 12}}, r"overrides\['head'\]\['w_bits'\]=12 .* from 2 to 8"),
    ({"head": {"bits": 8}}, "unknown keys"),
])
def test_bad_overrides(overrides, match):
    with pytest.raises(ValueError, match=match):
        ADFQConfig(overrides=overrides)


# -- ablations ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("switch, where, replaced", [
    ("ppoq", ["attn.qkv.input_quantizer", "mlp.fc1.input_quantizer"], PerPatchOutlierQuantizer),
    ("slq", ["mlp.fc2.input_quantizer"], ShiftLog2Quantizer),
    ("log_softmax", ["attn.matmul_av.a_quantizer"], LogSqrt2Quantizer),
])
def test_ablation_switches(make_tiny, images, switch, where, replaced):
    on = prepare(make_tiny("vit"), FAST.replace(act_family="log"))
    off = quantize(make_tiny("vit"), images, FAST.replace(**{switch: False}))
    for block in range(2):
        for path in where:
            assert type(on.get_submodule(f"blocks.{block}.{path}")) is replaced
            q = off.get_submodule(f"blocks.{block}.{path}")
            assert type(q) is UniformQuantizer and q.granularity == "tensor"
    assert not any(isinstance(q, replaced) for q in off.modules())
    assert torch.isfinite(run(off, images)).all()


def test_outlier_thresholds_reach_the_quantizers(tiny_vit):
    prepare(tiny_vit, FAST.replace(qkv_outlier_threshold=7.5, fc1_outlier_threshold=10))
    assert tiny_vit.blocks[0].attn.qkv.input_quantizer.threshold == 7.5
    assert tiny_vit.blocks[0].mlp.fc1.input_quantizer.threshold == 10.0


def test_slq_base_option(tiny_vit):
    prepare(tiny_vit, FAST.replace(slq_base="2"))
    assert tiny_vit.blocks[0].mlp.fc2.input_quantizer.log.base == "2"


@pytest.fixture(scope="module")
def post_gelu_and_softmax():
    """Real activations: the fc2 inputs and attention probabilities of the shipped ViT's third block."""
    from adfq_lightning.data import cifar10_eval_transform, load_bundle
    from adfq_lightning.zoo import create_reference_model

    model = create_reference_model("vit_cifar", pretrained=True)
    images = cifar10_eval_transform()(load_bundle()["calib_images"][:32])
    seen = {}
    block = model.blocks[2]
    block.mlp.fc2.register_forward_pre_hook(lambda m, args: seen.setdefault("fc2", args[0]))

    def probabilities(attn, args, out):
        x = args[0]
        q, k, _ = attn.qkv(x).reshape(*x.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        seen["probs"] = (q * attn.scale @ k.transpose(-2, -1)).softmax(-1)

    block.attn.register_forward_hook(probabilities)
    with torch.no_grad():
        model(images)
    return seen["fc2"], seen["probs"]


@pytest.mark.parametrize("bits, family", [(4, "log"), (8, "uniform")])
def test_log_quantizers_take_the_grid_with_the_lower_error(post_gelu_and_softmax, bits, family):
    """At 4 bits the log grids fit post-GELU values and softmax probabilities better; at 8 bits a uniform
    grid's fine steps do (the log grid's relative step is the same at every bit width)."""
    for log_q, data in zip((ShiftLog2Quantizer(bits), LogSqrt2Quantizer(bits)), post_gelu_and_softmax):
        q = BestOfQuantizer(log_q, UniformQuantizer(bits))
        q.calibrate(data)
        errors = {name: float((part.fake_quantize(data) - data).pow(2).mean()) for name, part in
                  (("log", q.log), ("uniform", q.uniform))}
        assert q.family == family == min(errors, key=errors.get)
        assert torch.equal(q(data), q.chosen(data)) and q.step_sizes() == q.chosen.step_sizes()
        reloaded = BestOfQuantizer(type(q.log)(bits), UniformQuantizer(bits))
        reloaded.load_state_dict(q.state_dict())
        assert reloaded.family == family and torch.equal(reloaded(data), q(data))


def test_family_choices_are_reported_per_module(tiny_vit, more_images):
    rec = reconstruct(tiny_vit, more_images[:8], ASMO.replace(reconstruct=False, w_bits=8, a_bits=8))
    families = {k: v for s in rec.stages for k, v in s.stats["families"].items()}
    assert set(families) == {f"blocks.{i}.{p}" for i in range(2) for p in ("mlp.fc2.fc2_input", "attn.attn_probs")}
    assert set(families.values()) <= {"log", "uniform"}


@pytest.fixture(scope="module")
def queries_and_keys():
    """Real (scaled) queries and keys of every attention of the shipped DeiT, on 32 calibration images."""
    from adfq_lightning.data import cifar10_eval_transform, load_bundle
    from adfq_lightning.zoo import create_reference_model

    model = create_reference_model("deit_cifar", pretrained=True)
    images = cifar10_eval_transform()(load_bundle()["calib_images"][:32])
    seen = []

    def record(attn, args, out):
        x = args[0]
        q, k, _ = attn.qkv(x).reshape(*x.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        seen.append((q * attn.scale, k))

    for block in model.blocks:
        block.attn.register_forward_hook(record)
    with torch.no_grad():
        model(images)
    return seen


def test_qkv_grids_search_the_reference_error(tiny_vit):
    roles = {"q": 2.4, "k": 2.4, "v": 2.4, "proj_input": 2.0}
    for p, config in ((2.4, FAST), (2.0, FAST.replace(qkv_error_p=2.0))):
        prepare(model := copy.deepcopy(tiny_vit), config)
        found = {q.role: q.p for q in model.modules() if isinstance(q, UniformQuantizer) and q.role in roles}
        assert found == {role: (p if role != "proj_input" else 2.0) for role in roles}


@pytest.mark.parametrize("bits", [4, 6])
def test_keys_searched_with_l2_4_keep_their_range_and_the_attention(queries_and_keys, bits):
    """The squared error clips the few large keys that decide where a query attends; the reference's L2.4 keeps
    a range at least as wide in every block and, over the blocks, attention probabilities closer to FP."""
    scales, errors = {}, {}
    for p in (2.0, 2.4):
        scales[p], errors[p] = [], 0.0
        for q, k in queries_and_keys:
            quantizer = UniformQuantizer(bits, p=p)
            quantizer.calibrate(k)
            scales[p].append(float(quantizer.scale))
            fp, quantized = (q @ k.transpose(-2, -1)).softmax(-1), (q @ quantizer(k).transpose(-2, -1)).softmax(-1)
            errors[p] += float((quantized - fp).abs().sum(-1).mean())
    assert all(wide >= narrow for wide, narrow in zip(scales[2.4], scales[2.0]))
    assert errors[2.4] < 0.97 * errors[2.0]


# -- bad inputs -----------------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("field", ["w_bits", "a_bits"])
@pytest.mark.parametrize("bits", [0, 1, 9, 16, True, 4.0, "4"])
def test_config_rejects_bits_outside_range(field, bits):
    with pytest.raises(ValueError, match=rf"{field}={bits!r} is not supported: use an integer from 2 to 8"):
        ADFQConfig(**{field: bits})


@pytest.mark.parametrize("changes, match", [
    ({"method": "gptq"}, "method"),
    ({"qkv_outlier_threshold": 0}, "qkv_outlier_threshold"),
    ({"fc1_outlier_threshold": float("nan")}, "fc1_outlier_threshold"),
    ({"iters": 0}, "iters"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"init_samples": -1}, "init_samples"),
    ({"qdrop_prob": 0.0}, "qdrop_prob"),
    ({"warmup": 1.0}, "warmup"),
    ({"kl_temperature": 0}, "kl_temperature"),
    ({"rounding_lr": -1e-3}, "rounding_lr"),
    ({"qkv_error_p": 0.5}, "qkv_error_p=0.5 must be a number from 1 to 8"),
    ({"qkv_error_p": float("nan")}, "qkv_error_p"),
])
def test_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        ADFQConfig(**changes)


@pytest.mark.parametrize("iters, lr", [(3000, 3e-3), (1000, 9e-3), (100, 0.09), (10, 0.1), (20000, 3e-3)])
def test_rounding_lr_scales_with_the_budget(iters, lr):
    assert ADFQConfig(iters=iters).effective_rounding_lr == pytest.approx(lr)
    assert ADFQConfig(iters=iters, rounding_lr=1e-2).effective_rounding_lr == 1e-2  # an explicit rate wins


def test_optimizer_uses_the_budget_scaled_rounding_lr(tiny_vit):
    config = ADFQConfig(iters=100)
    optimizer = make_optimizer(convert(tiny_vit, config), config)
    assert len(optimizer.param_groups[0]["params"]) > 0 and optimizer.param_groups[0]["lr"] == pytest.approx(0.09)


def test_config_round_trips_through_dict():
    cfg = ADFQConfig(w_bits=3, overrides={"head": {"w_bits": 8}}, slq_base="2")
    assert ADFQConfig(**cfg.to_dict()) == cfg
    assert cfg.replace(a_bits=6).a_bits == 6 and cfg.a_bits == 4


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


# -- ASMO reconstruction --------------------------------------------------------------------------------------------
ASMO = ADFQConfig(iters=30, batch_size=8, seed=0)


def reconstruct(model, images, config):
    prepare(model, config)
    rec = Reconstructor(model, config, images, torch.arange(len(images)), len(images))
    rec.run()
    return rec


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
