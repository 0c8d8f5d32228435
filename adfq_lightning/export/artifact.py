"""The deployable artifact: packed integer weights and every quantizer parameter in one safetensors file.

The file holds the state of the deployed model (:func:`~adfq_lightning.export.deploy`): weight codes packed by
bit width, per-channel scales and zero points, biases, the float parameters that stay float (norms, tokens,
position embeddings; as float16 where that is lossless), and every activation quantizer's buffers (per-patch
scales, clip bounds, log steps and shifts). A JSON header in the safetensors metadata names the model, its
constructor arguments, the recipe and the package version. Loading reads no pickle and runs no calibration.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..config import ADFQConfig
from ..atomic import atomic_write
from ..models import RandomWeightsWarning, create_model
from ..modules import convert, is_quantized
from ..quantizers import BestOfQuantizer
from ..reconstruction import check_supported
from .deployed import _IntWeight, deploy
from .packing import pack_codes, unpack_codes

__all__ = ["ARTIFACT_FORMAT", "export_quantized", "load_exported"]

ARTIFACT_FORMAT = "adfq-lightning-artifact/1"
HEADER_KEY = "adfq_lightning"


def _architecture(model: nn.Module, model_name: Optional[str]) -> str:
    name = model_name or getattr(model, "pretrained_cfg", {}).get("architecture")
    if not name:
        raise ValueError("export_quantized() needs model_name=: the timm (or reference) model name the file is "
                         "loaded back into.")
    return name


def export_quantized(model: nn.Module, path: Union[str, Path], config: ADFQConfig, model_name: Optional[str] = None,
                     model_kwargs: Optional[dict[str, Any]] = None) -> Path:
    """Write the deployable artifact of a quantized ``model`` (the model itself is not changed).

    ``model_name`` defaults to timm's ``pretrained_cfg["architecture"]``; ``model_kwargs`` are the arguments it
    was created with (``num_classes``, ``img_size``...), so that :func:`load_exported` can build it again.
    """
    from .. import __version__

    name = _architecture(model, model_name)
    deployed = deploy(copy.deepcopy(model))
    state = deployed.state_dict()
    packed = {}
    for prefix, layer in deployed.named_modules():
        if isinstance(layer, _IntWeight):
            key = f"{prefix}.weight_codes"
            packed[key] = {"bits": layer.bits, "shape": list(state[key].shape)}
            state[key] = pack_codes(state[key], layer.bits)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    halved = sorted(k for k, v in tensors.items() if _exact_in_float16(v))
    tensors.update({k: tensors[k].half() for k in halved})
    families = {n: q.family for n, q in model.named_modules() if isinstance(q, BestOfQuantizer)}
    header = {"format": ARTIFACT_FORMAT, "model": name, "model_kwargs": model_kwargs or {}, "config": config.to_dict(),
              "adfq_lightning": __version__, "packed": packed, "families": families, "float16": halved}
    path = Path(path)
    atomic_write(path, safetensors_bytes(tensors, metadata={HEADER_KEY: json.dumps(header)}))
    return path


def _exact_in_float16(t: torch.Tensor) -> bool:
    """A float32 tensor that float16 holds without loss (weights trained or shipped in half precision): stored
    as float16, half the bytes, loaded back bit for bit."""
    return t.dtype == torch.float32 and bool(torch.equal(t.half().float(), t))


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}): it is truncated "
                         "or corrupt; export it again with export_quantized().") from err
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is a safetensors file but not an adfq-lightning artifact (no valid "
                         f"'{HEADER_KEY}' header): export it with export_quantized().") from err
    if header.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path} has format {header.get('format')!r}; this version reads {ARTIFACT_FORMAT!r}.")
    return header, tensors


def load_exported(path: Union[str, Path], model: Optional[nn.Module] = None) -> nn.Module:
    """The deployed model of an artifact written by :func:`export_quantized`, in eval mode.

    The architecture is built from the header (``model`` to load into a float model you built yourself), its
    modules are swapped for the deployed ones, and the file's tensors are loaded: no pickle, no calibration.
    """
    path = Path(path)
    header, tensors = _read(path)
    config = ADFQConfig(**header["config"])
    if model is None:
        with warnings.catch_warnings():  # every weight comes from the file: the model is random only until then
            warnings.simplefilter("ignore", RandomWeightsWarning)
            model = create_model(header["model"], pretrained=False, **header["model_kwargs"])
    check_supported(model)
    if not any(is_quantized(m) for m in model.modules()):
        convert(model, config)
    for name, family in header.get("families", {}).items():  # which grid each log/uniform choice took
        model.get_submodule(name)._uniform = family == "uniform"
    deploy(model, require_calibrated=False)
    for key, spec in header["packed"].items():
        if key not in tensors:
            raise ValueError(f"{path} lacks {key}: the file is corrupt.")
        tensors[key] = unpack_codes(tensors[key], spec["bits"], tuple(spec["shape"]))
    for key in header.get("float16", []):
        if key in tensors:
            tensors[key] = tensors[key].float()
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path} has NaN/Inf values in {bad[:3]}: the file is corrupt.")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:  # missing/unexpected keys or shape mismatches, as torch reports them
        raise ValueError(f"{path} does not fit {header['model']} built with {header['model_kwargs'] or 'its defaults'}"
                         f": {str(err)[:500]}") from err
    return model.eval()
