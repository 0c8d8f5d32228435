"""The method's table: which quantizer each tensor gets, and the options that change it."""

from __future__ import annotations

import copy

import pytest
import torch

from adfq_lightning import ADFQConfig, prepare, quantize
from adfq_lightning.quantizers import (
    AdaRoundQuantizer,
    BestOfQuantizer,
    LogSqrt2Quantizer,
    PerPatchOutlierQuantizer,
    ShiftLog2Quantizer,
    UniformQuantizer,
)
from quantized_helpers import ASMO, FAST, quantizers, reconstruct, run


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
