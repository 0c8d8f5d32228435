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

from ..checkpoint import recipe_differences
from ..config import ADFQConfig
from ..atomic import atomic_write
from ..models import RandomWeightsWarning, create_model, is_known_model
from ..modules import convert, is_quantized
from ..quantizers import BestOfQuantizer
from ..reconstruction import check_supported
from ..recipe import model_recipe, plain, same_argument
from .deployed import _IntWeight, deploy
from .packing import pack_codes, unpack_codes

__all__ = ["ARTIFACT_FORMAT", "export_quantized", "load_exported"]

ARTIFACT_FORMAT = "adfq-lightning-artifact/2"
#: earlier formats this version still reads (format 1 packed 2-3-bit codes in nibbles, 5-7-bit codes in bytes)
_READABLE_FORMATS = ("adfq-lightning-artifact/1", ARTIFACT_FORMAT)
HEADER_KEY = "adfq_lightning"


def _resolve(model: nn.Module, config: Optional[ADFQConfig], model_name: Optional[str],
             model_kwargs: Optional[dict[str, Any]]) -> tuple[ADFQConfig, str, dict[str, Any]]:
    """The recipe an export writes: the model's own (:func:`~adfq_lightning.recipe.model_recipe`), with what the
    caller gave checked against what the model recorded."""
    recipe = model_recipe(model)
    if config is None:
        if recipe is None or recipe.config is None:
            raise ValueError("export_quantized() needs config=: this model carries no quantization recipe (it was "
                             "not quantized by quantize(), prepare() or a checkpoint loader of this package).")
        config = recipe.config
    elif recipe is not None and recipe.config is not None:
        differ = recipe_differences(recipe.config, config)
        if differ:
            raise ValueError(f"config= differs from the recipe this model was quantized with: "
                             f"{'; '.join(d.replace('in the file', 'in the model') for d in differ)}. Drop config= "
                             "to export the model's own.")
    recorded = recipe is not None and recipe.recorded
    name = model_name or (recipe.architecture if recipe is not None else None)
    if not name:
        raise ValueError("export_quantized() needs model_name=: the timm (or reference) model name the file is "
                         "loaded back into.")
    if recorded and model_name and model_name != recipe.architecture:
        raise ValueError(f"model_name={model_name!r} but this model was built as {recipe.architecture!r}: drop "
                         "model_name= to export it as it was built.")
    kwargs = dict(recipe.model_kwargs) if recipe is not None and recipe.architecture == name else {}
    for key, value in (model_kwargs or {}).items():
        if recorded and key in kwargs and not same_argument(kwargs[key], value):
            raise ValueError(f"model_kwargs[{key!r}]={value!r} but this model was built with {key}={kwargs[key]!r}: "
                             "drop model_kwargs= to export it as it was built.")
        kwargs[key] = plain(value)
    return config, name, kwargs


def export_quantized(model: nn.Module, path: Union[str, Path], config: Optional[ADFQConfig] = None,
                     model_name: Optional[str] = None, model_kwargs: Optional[dict[str, Any]] = None) -> Path:
    """Write the deployable artifact of a quantized ``model`` (the model itself is not changed).

    The model's recipe gives the config, the model name and the arguments that build it again
    (:func:`~adfq_lightning.recipe.model_recipe`); ``config``, ``model_name`` and ``model_kwargs`` are needed only
    for a model that carries none, and are checked against it otherwise. Before the file is written it is
    loaded back as :func:`load_exported` would: an export that could not be is refused, naming what is missing.
    A ``model_name`` that neither timm nor the reference models know is written with a warning: such a file
    loads only into a model you build, ``load_exported(path, model=...)``.
    """
    from .. import __version__

    config, name, kwargs = _resolve(model, config, model_name, model_kwargs)
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
    header = {"format": ARTIFACT_FORMAT, "model": name, "model_kwargs": kwargs, "config": config.to_dict(),
              "adfq_lightning": __version__, "packed": packed, "families": families, "float16": halved}
    try:
        if is_known_model(name):
            _rebuild(header, dict(tensors), "the export")
        else:
            warnings.warn(f"{name!r} is neither a timm nor a reference model name: load_exported(path) cannot build "
                          "it, load the file with load_exported(path, model=<the float model>).", stacklevel=2)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"export refused, the file could not be loaded back: {str(err).rstrip('.')}. Pass model_kwargs= with the "
                         "arguments the model was built with (img_size, patch_size, embed_dim, depth, num_heads, "
                         "num_classes, window_size...).") from err
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
    if header.get("format") not in _READABLE_FORMATS:
        raise ValueError(f"{path} has format {header.get('format')!r}; this version reads {_READABLE_FORMATS}.")
    return header, tensors


def load_exported(path: Union[str, Path], model: Optional[nn.Module] = None) -> nn.Module:
    """The deployed model of an artifact written by :func:`export_quantized`, in eval mode.

    The architecture is built from the header (``model`` to load into a float model you built yourself), its
    modules are swapped for the deployed ones, and the file's tensors are loaded: no pickle, no calibration.
    """
    path = Path(path)
    header, tensors = _read(path)
    return _rebuild(header, tensors, str(path), model)


def _rebuild(header: dict, tensors: dict[str, torch.Tensor], source: str, model: Optional[nn.Module] = None) -> nn.Module:
    """The deployed model of an artifact's header and tensors (``tensors`` is changed in place)."""
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
            raise ValueError(f"{source} lacks {key}: the file is corrupt.")
        tensors[key] = unpack_codes(tensors[key], spec["bits"], tuple(spec["shape"]),
                                    dense=header["format"] != _READABLE_FORMATS[0])
    for key in header.get("float16", []):
        if key in tensors:
            tensors[key] = tensors[key].float()
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{source} has NaN/Inf values in {bad[:3]}: the file is corrupt.")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:  # missing/unexpected keys or shape mismatches, as torch reports them
        raise ValueError(f"{source} does not fit {header['model']} built with {header['model_kwargs'] or 'its defaults'}"
                         f": {' '.join(str(err).split())[:500].rstrip('.')}") from err
    return model.eval()
