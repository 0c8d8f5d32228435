"""Deploying a quantized model: integer weights, a safetensors artifact, ``torch.export`` and ONNX.

``deploy`` (the deployable module tree), ``export_quantized``/``load_exported`` (safetensors artifact),
``export_program``/``load_program`` (``torch.export``) and ``export_onnx``/``onnx_session`` (ONNX, the
``[export]`` extra). Every export reproduces the calibrated fake-quant model's outputs.
"""

from .artifact import ARTIFACT_FORMAT, export_quantized, load_exported
from .deployed import deploy, is_deployed
from .onnx import export_onnx, onnx_session
from .program import export_program, load_program

FORMATS = ("safetensors", "onnx", "pt2")

__all__ = [
    "ARTIFACT_FORMAT",
    "FORMATS",
    "deploy",
    "export_onnx",
    "export_program",
    "export_quantized",
    "is_deployed",
    "load_exported",
    "load_program",
    "onnx_session",
]
