"""Deployable models: integer weights, the safetensors artifact, torch.export and ONNX, with parity checks."""

from __future__ import annotations

import copy
import math
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from adfq_lightning import ADFQConfig, quantize, set_quantization
from adfq_lightning.export import (
    deploy,
    export_onnx,
    export_program,
    export_quantized,
    load_exported,
    load_program,
    onnx_session,
)
from adfq_lightning.export.deployed import IntConv2d, IntLinear
from adfq_lightning.models import RandomWeightsWarning
from adfq_lightning.export.packing import pack_codes, unpack_codes

from conftest import build_tiny, make_images

CONFIGS = {
    "adfq_w4a4": ADFQConfig(iters=3, batch_size=4, init_samples=8, act_family="log"),  # the log grids, always
    "minmax_w3a3": ADFQConfig.preset("minmax", w_bits=3, a_bits=3),
    "adfq_w8a8": ADFQConfig(w_bits=8, a_bits=8, reconstruct=False, init_samples=8),
    "adfq_w4a4_bias_corrected": ADFQConfig(reconstruct=False, init_samples=8, bias_correction=True),
}


def quantized(arch: str, name: str = "adfq_w4a4"):
    model = build_tiny(arch)
    quantize(model, make_images(16, seed=2), CONFIGS[name])
    return model, CONFIGS[name]


@torch.no_grad()
def outputs(model, x):
    return model(x)


@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_pack_densely_and_unpack_for_every_bit_width(bits):
    codes = torch.randint(0, 2**bits, (7, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.numel() == -(-35 * bits // 8)  # 35 codes of b bits: ceil(35 b / 8) bytes
    assert torch.equal(unpack_codes(packed, bits, (7, 5)), codes)
    with pytest.raises(ValueError, match="corrupt"):
        unpack_codes(packed[:-3], bits, (7, 5))


@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_of_format_1_artifacts_still_unpack(bits):
    """Format 1 kept 2-4-bit codes two to a byte (low nibble first) and 5-8-bit codes one to a byte."""
    codes = torch.randint(0, 2**bits, (7, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    flat = codes.reshape(-1)
    legacy = flat.clone() if bits > 4 else flat[0::2] | (torch.cat([flat[1::2], flat.new_zeros(1)]) << 4)
    assert torch.equal(unpack_codes(legacy, bits, (7, 5), dense=False), codes)


def test_a_mix_of_widths_packs_each_layer_at_its_own_width_and_round_trips(tmp_path):
    """3-bit and 6-bit blocks in one artifact: each layer's codes take ceil(n * bits / 8) bytes on disk."""
    from adfq_lightning.export.artifact import _read
    from adfq_lightning.export.packing import packed_size

    overrides = {**ADFQConfig().overrides, "blocks.0.*": {"w_bits": 3}, "blocks.1.*": {"w_bits": 6}}
    config = ADFQConfig(w_bits=4, a_bits=4, reconstruct=False, overrides=overrides)
    model = quantize(build_tiny("vit"), make_images(16), config)
    path = export_quantized(model, tmp_path / "mixed.safetensors")
    header, tensors = _read(path)
    widths = {key: spec["bits"] for key, spec in header["packed"].items()}
    assert {widths["blocks.0.attn.qkv.weight_codes"], widths["blocks.1.mlp.fc2.weight_codes"]} == {3, 6}
    for key, spec in header["packed"].items():
        numel = math.prod(spec["shape"])
        assert tensors[key].numel() == packed_size(numel, spec["bits"]), key
    x = make_images(4)
    with torch.no_grad():
        assert torch.equal(load_exported(path)(x), deploy(copy.deepcopy(model))(x))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_deployed_model_reproduces_the_fake_quant_model(arch, name):
    model, _ = quantized(arch, name)
    deployed = deploy(copy.deepcopy(model))
    assert any(isinstance(m, IntLinear) for m in deployed.modules())
    assert any(isinstance(m, IntConv2d) for m in deployed.modules())
    codes = [m.weight_codes for m in deployed.modules() if isinstance(m, (IntLinear, IntConv2d))]
    assert all(c.dtype == torch.uint8 and int(c.max()) < 2**8 for c in codes)
    x = make_images(6, seed=7)
    assert torch.equal(outputs(deployed, x), outputs(model, x))


@pytest.mark.parametrize("name", ["adfq_w4a4", "adfq_w8a8", "adfq_w4a4_bias_corrected"])  # log grids / the uniform
# grids chosen at 8 bits / corrected biases (folded into the deployed bias)
def test_safetensors_artifact_round_trip_is_exact_and_small(arch, name, tmp_path):
    model, config = quantized(arch, name)
    path = export_quantized(model, tmp_path / "q.safetensors", config, model_name=f"tiny_{arch}")
    loaded = load_exported(path, model=build_tiny(arch, seed=9))  # other float weights: all come from the file
    x = make_images(6, seed=7)
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    fp32 = sum(t.numel() * 4 for t in build_tiny(arch).state_dict().values())
    assert os.path.getsize(path) < fp32  # 4-bit codes, two a byte (tiny models: headers weigh a lot)


def test_float_tensors_exact_in_float16_are_stored_as_float16(tmp_path):
    model = build_tiny("vit")
    with torch.no_grad():  # weights as if trained or shipped in half precision
        for p in model.parameters():
            p.copy_(p.half().float())
    config = CONFIGS["adfq_w4a4"]
    quantize(model, make_images(16, seed=2), config)
    path = export_quantized(model, tmp_path / "q.safetensors", config, model_name="tiny_vit")
    with safe_open(str(path), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["pos_embed"] == dtypes["norm.weight"] == "F16"
    assert all(dtypes[k] == "F32" for k in dtypes if k.endswith("weight_scale"))  # calibrated: not exact in F16
    loaded = load_exported(path, model=build_tiny("vit", seed=9))
    assert loaded.pos_embed.dtype == torch.float32
    x = make_images(6, seed=7)
    assert torch.equal(outputs(loaded, x), outputs(model, x))


def test_reference_model_artifact_builds_itself_from_the_header(tmp_path):
    from adfq_lightning.zoo import create_reference_model

    model = create_reference_model("vit_cifar")  # random weights: only the mechanics are tested here
    config = ADFQConfig(reconstruct=False, init_samples=8)
    quantize(model, torch.randn(8, 3, 32, 32), config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # the weights come from the file: no random-weight alarm
        loaded = load_exported(export_quantized(model, tmp_path / "vit.safetensors", config))
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(outputs(loaded, x), outputs(model, x))


@pytest.mark.slow
def test_torch_export_program_round_trip_with_dynamic_batch(tmp_path):
    model, _ = quantized("swin")
    path = export_program(model, tmp_path / "q.pt2", make_images(2))
    assert not any("stack_trace" in n.meta for n in torch.export.load(path).graph.nodes)  # no source lines shipped
    loaded = load_program(path)
    for n in (1, 5):
        x = make_images(n, seed=n)
        assert torch.equal(loaded(x), outputs(model, x))


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_fake_quant_model_traces_with_torch_export(strict):
    model, _ = quantized("vit")
    x = make_images(3, seed=4)
    program = torch.export.export(model, (x,), strict=strict)
    assert torch.equal(program.module()(x), outputs(model, x))


@pytest.mark.slow
def test_onnx_export_uses_standard_qdq_and_matches_onnx_runtime(arch, tmp_path):
    import onnx

    model, _ = quantized(arch)
    path = export_onnx(model, tmp_path / "q.onnx", make_images(2))
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Pow", "Where"} <= ops and "Exp2" not in ops
    assert any(i.data_type == onnx.TensorProto.UINT8 and len(i.dims) >= 2 for i in graph.initializer)  # int weights
    session = onnx_session(path)
    x = make_images(5, seed=11)  # another batch size than the one exported
    got, expected = session.run(None, {"images": x.numpy()})[0], outputs(model, x).numpy()
    # ONNX Runtime's float kernels may put a value on a grid's rounding edge into the next code: rows match
    # to float precision unless that happens, and predictions match
    close_rows = np.abs(got - expected).max(axis=1) < 1e-4
    assert close_rows.sum() >= 4 and (got.argmax(1) == expected.argmax(1)).all()


def test_uncalibrated_or_switched_off_model_is_refused(tmp_path):
    from adfq_lightning import prepare

    model = prepare(build_tiny("vit"), ADFQConfig())
    with pytest.raises(ValueError, match="not calibrated.*quantize"):
        export_quantized(model, tmp_path / "q.safetensors", ADFQConfig(), model_name="tiny")
    calibrated, config = quantized("vit")
    set_quantization(calibrated, False)
    with pytest.raises(ValueError, match="switched off.*set_quantization"):
        export_onnx(calibrated, tmp_path / "q.onnx", make_images(2))
    assert not any(tmp_path.iterdir())


def test_float_model_is_refused_and_an_unnamed_model_exports_from_its_structure(tmp_path):
    with pytest.raises(ValueError, match="quantize"):
        deploy(build_tiny("vit"))
    model, config = quantized("vit")
    model.pretrained_cfg = {}  # no timm name: the architecture is read off the model's structure
    path = export_quantized(model, tmp_path / "q.safetensors")
    x = make_images(2)
    with torch.no_grad():
        assert torch.allclose(load_exported(path)(x), model(x), atol=1e-5)


@pytest.mark.slow
def test_corrupt_and_truncated_files_are_refused(tmp_path):
    model, config = quantized("vit")
    artifact = export_quantized(model, tmp_path / "q.safetensors", config, model_name="tiny")
    program = export_program(model, tmp_path / "q.pt2", make_images(2))
    onnx_file = export_onnx(model, tmp_path / "q.onnx", make_images(2))
    for path in (artifact, program, onnx_file):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_exported(artifact, model=build_tiny("vit"))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_program(program)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        onnx_session(onnx_file)
    other = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not an adfq-lightning artifact"):
        load_exported(other, model=build_tiny("vit"))


def test_artifact_of_another_architecture_is_refused(tmp_path):
    model, config = quantized("vit")
    path = export_quantized(model, tmp_path / "q.safetensors", config, model_name="tiny_vit")
    with pytest.raises(ValueError, match="does not fit"):
        load_exported(path, model=build_tiny("deit"))


def test_unwritable_path_is_named_and_leaves_nothing_behind(tmp_path):
    model, config = quantized("vit")
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the output directory should be")
    for write in (lambda p: export_quantized(model, p, config, model_name="tiny"),
                  lambda p: export_program(model, p, make_images(2))):
        with pytest.raises(OSError, match=r"cannot write .*not_a_directory.*choose a writable path"):
            write(blocker / "out" / "q.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_directory"]


def test_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    from adfq_lightning import atomic as io_module

    model, config = quantized("vit")
    path = export_quantized(model, tmp_path / "q.safetensors", config, model_name="tiny")
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_module.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        export_quantized(model, path, config, model_name="tiny")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]


@pytest.mark.slow
def test_torch_compile_captures_one_graph():
    """No graph break (``fullgraph=True``) in the fake-quant or the deployed forward; ``aot_eager`` runs the
    captured graph without a C++ toolchain, which inductor (the default backend, in the export benchmark) needs."""
    model, _ = quantized("vit")
    deployed = deploy(copy.deepcopy(model))
    x = make_images(3, seed=4)
    for m in (model, deployed):
        torch.compiler.reset()
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
        assert torch.equal(outputs(compiled, x), outputs(model, x))


@pytest.mark.slow
def test_mixed_widths_export_to_program_and_onnx_with_parity(tmp_path):
    """Per-layer weight and activation widths (3 and 6 bits in one model) survive torch.export and ONNX."""
    overrides = {**ADFQConfig().overrides, "blocks.0.*": {"w_bits": 3, "a_bits": 6},
                 "blocks.1.*": {"w_bits": 6, "a_bits": 3}}
    model = quantize(build_tiny("vit"), make_images(16), ADFQConfig(reconstruct=False, overrides=overrides))
    assert {model.blocks[0].mlp.fc1.input_quantizer.bits, model.blocks[1].mlp.fc1.input_quantizer.bits} == {3, 6}
    x = make_images(3, seed=5)
    program = load_program(export_program(model, tmp_path / "q.pt2", make_images(2)))
    assert torch.equal(program(x), outputs(model, x))
    got = onnx_session(export_onnx(model, tmp_path / "q.onnx", make_images(2))).run(None, {"images": x.numpy()})[0]
    expected = outputs(model, x).numpy()
    assert (np.abs(got - expected).max(axis=1) < 1e-4).sum() >= 2 and (got.argmax(1) == expected.argmax(1)).all()
