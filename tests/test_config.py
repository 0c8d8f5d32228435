"""ADFQConfig: presets, per-layer bits and overrides, value checks, the budget-scaled rounding rate."""

from __future__ import annotations

import pytest

from adfq_lightning import ADFQConfig, prepare
from adfq_lightning.modules import convert
from adfq_lightning.reconstruction import make_optimizer


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
