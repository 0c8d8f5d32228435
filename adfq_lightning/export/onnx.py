"""ONNX export of a deployed model with standard QuantizeLinear/DequantizeLinear, and an ONNX Runtime session.

Needs the ``[export]`` extra (``onnx``, ``onnxscript``, ``onnxruntime``). The exporter is PyTorch's own
(``torch.onnx.export(dynamo=True)``); the two adfq operators get translations to standard ONNX (opset 18):

* ``adfq::dequantize_weight`` -> ``DequantizeLinear(uint8 codes, scale, zero_point, axis=0)``: weights are
  stored as integers in the file;
* ``adfq::quantize_dequantize`` -> ``Min``/``Max`` (clip to the b-bit grid) -> ``QuantizeLinear`` ->
  ``DequantizeLinear``, per tensor or per token (``axis``).

Outlier bypass and the log quantizers are exported as the plain ops they are made of (``Abs``, ``Greater``,
``Where``; ``Add``, ``Log``, ``Round``, ``Pow``); see ``adfq_lightning.export.deployed``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..atomic import atomic_write
from .deployed import deploy, is_deployed

__all__ = ["ONNX_OPSET", "export_onnx", "onnx_session"]

ONNX_OPSET = 18


def _translations() -> dict:
    try:
        from onnxscript import opset18 as op
    except ImportError as err:
        raise ImportError("ONNX export needs the export extra: pip install 'adfq-lightning[export]'") from err

    def quantize_dequantize(x, scale, zero_point, low, high, axis: int):
        if axis >= 0:  # per token: (tokens,) parameters broadcast over (..., tokens, channels)
            low, high = op.Unsqueeze(low, [1]), op.Unsqueeze(high, [1])
            clipped = op.Max(op.Min(x, high), low)
            return op.DequantizeLinear(op.QuantizeLinear(clipped, scale, zero_point, axis=axis), scale, zero_point,
                                       axis=axis)
        clipped = op.Max(op.Min(x, high), low)
        return op.DequantizeLinear(op.QuantizeLinear(clipped, scale, zero_point), scale, zero_point)

    def dequantize_weight(codes, scale, zero_point):
        return op.DequantizeLinear(codes, scale, zero_point, axis=0)

    return {torch.ops.adfq.quantize_dequantize.default: quantize_dequantize,
            torch.ops.adfq.dequantize_weight.default: dequantize_weight}


@torch.no_grad()
def export_onnx(model: nn.Module, path: Union[str, Path], example: torch.Tensor, dynamic_batch: bool = True) -> Path:
    """Write ``model`` (quantized, or already deployed) as an ONNX file; ``example`` is one input batch."""
    deployed = model if is_deployed(model) else deploy(copy.deepcopy(model))
    shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
    program = torch.onnx.export(deployed.eval(), (example.clone(),), dynamo=True, opset_version=ONNX_OPSET,
                                dynamic_shapes=shapes, custom_translation_table=_translations(), verbose=False,
                                input_names=["images"], output_names=["logits"])
    model = program.model_proto
    for node in model.graph.node:  # the exporter's per-node provenance (stack traces, FX names): 2/3 of the file
        del node.metadata_props[:]
    for value in model.graph.value_info:
        del value.metadata_props[:]
    path = Path(path)
    atomic_write(path, model.SerializeToString())
    return path


def onnx_session(path: Union[str, Path]):
    """An ONNX Runtime CPU session for an exported model.

    Graph optimisation stays at the basic level: ONNX Runtime's extended level fuses QDQ + MatMul into integer
    kernels that take per-tensor activation scales only, and per-patch (per-token) scales are the method's.
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError("running ONNX needs the export extra: pip install 'adfq-lightning[export]'") from err
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime reports a bad protobuf as its own exception types
        raise ValueError(f"{path} is not a readable ONNX model ({type(err).__name__}: {str(err)[:200]}): it is "
                         "truncated or corrupt; export it again with export_onnx().") from err
