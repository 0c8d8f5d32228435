"""Deploying a quantized model: integer weights, a safetensors artifact, ``torch.export`` and ONNX.

``deploy`` (the deployable module tree), ``export_quantized``/``load_exported`` (safetensors artifact),
``export_program``/``load_program`` (``torch.export``) and ``export_onnx``/``onnx_session`` (ONNX, the
``[export]`` extra); ``export_all`` writes several formats at once. Every export reproduces the calibrated fake-quant model's outputs.
"""

from .artifact import ARTIFACT_FORMAT, export_quantized, load_exported
from .deployed import deploy, is_deployed
from .formats import FORMATS, example_input, export_all
from .onnx import export_onnx, onnx_session
from .program import export_program, load_program

__all__ = [
    "ARTIFACT_FORMAT",
    "FORMATS",
    "deploy",
    "example_input",
    "export_all",
    "export_onnx",
    "export_program",
    "export_quantized",
    "is_deployed",
    "load_exported",
    "load_program",
    "onnx_session",
]
