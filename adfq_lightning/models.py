"""Build the model to quantize: a reference CIFAR-10 model or any timm model, with its weights.

Weights come through timm's own mechanisms: ``pretrained=True`` (the Hugging Face hub or its cache),
``checkpoint_path`` (``timm.models.load_checkpoint``: a bare state_dict or one under ``model``,
``state_dict`` or ``state_dict_ema``, DDP ``module.`` prefixes stripped) or
``pretrained_cfg_overlay={"file": path}`` (a local copy of a pretrained tag's file, adapted by timm like a
download, e.g. to another ``num_classes``). A model left with random weights is announced loudly.
"""

from __future__ import annotations

import difflib
import os
import warnings
from typing import Optional

import timm
import torch
from torch import nn

from .recipe import record_build
from .zoo import REFERENCE_MODELS, STRESS_VARIANTS, create_reference_model, is_reference_model

__all__ = ["RandomWeightsWarning", "create_model", "is_known_model"]

OFFLINE_HELP = ("Offline? Put the weights in the Hugging Face cache and set HF_HUB_OFFLINE=1, or set "
                "pretrained: false and checkpoint_path: <local file> (your own checkpoint), or keep pretrained: true "
                "with model_kwargs: {pretrained_cfg_overlay: {file: <local copy of the pretrained weights>}}.")
#: file names a timm pretrained tag keeps on the hub
HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class RandomWeightsWarning(UserWarning):
    """The model to quantize has random weights: its quantized accuracy means nothing."""


def is_known_model(name: str) -> bool:
    """A name :func:`create_model` builds: a reference CIFAR-10 model or a timm model."""
    return is_reference_model(name) or timm.is_model(name)


def _check_known(name: str) -> None:
    if is_known_model(name):
        return
    # timm's names are long (deit_small_patch16_224): rank the models sharing a word of the name
    words = [w for w in name.lower().replace("-", "_").split("_") if len(w) >= 3]
    pool = sorted({m for w in words for m in timm.list_models(f"*{w}*")}) or timm.list_models()
    close = difflib.get_close_matches(name, list(REFERENCE_MODELS) + list(STRESS_VARIANTS) + pool, n=5, cutoff=0.3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown model {name!r}: {hint}See timm.list_models('*vit*') (or '*deit*', '*swin*') for timm's "
                     f"names; the reference CIFAR-10 models are {sorted(REFERENCE_MODELS)}.")


def _check_pretrained_reachable(name: str, kwargs: dict) -> None:
    """Fail within seconds, not after the hub's retries, when pretrained weights can be neither read nor fetched."""
    import huggingface_hub
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if (kwargs.get("pretrained_cfg_overlay") or {}).get("file"):
        return
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return  # weights from a plain URL: timm reports its own error
    repo_id, _, revision = hub_id.partition("@")
    cache_dir = kwargs.get("cache_dir")
    if any(isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache_dir, revision=revision or None), str)
           for f in HUB_FILES):
        return
    if huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise RuntimeError(f"could not fetch pretrained weights for {name!r}: HF_HUB_OFFLINE is set and they are not "
                           f"in the Hugging Face cache ({repo_id}). {OFFLINE_HELP}")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, HUB_FILES[0], revision=revision or None), timeout=5)
    except Exception as err:  # no network, DNS failure, proxy, 404...: the hub client raises many types
        raise RuntimeError(f"could not fetch pretrained weights for {name!r} from the Hugging Face hub "
                           f"({type(err).__name__}: {str(err)[:200]}). {OFFLINE_HELP}") from err


def _load_checkpoint(model: nn.Module, name: str, checkpoint_path: str, kwargs: dict) -> None:
    if not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"checkpoint_path {checkpoint_path!r} is not a file.")
    try:
        timm.models.load_checkpoint(model, checkpoint_path)
    except (RuntimeError, KeyError) as err:  # torch's missing/unexpected/size-mismatch report
        raise ValueError(f"{checkpoint_path} does not fit {name!r} built with {kwargs or 'its defaults'}: build the "
                         f"model it was trained as (model_kwargs: num_classes, img_size, ...). {str(err)[:800]}") from err
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"{checkpoint_path} has NaN/Inf values in {bad[:5]}: the checkpoint is corrupt.")


def create_model(name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None, **kwargs) -> nn.Module:
    """A reference CIFAR-10 model (``vit_cifar`` ...) or any timm model by name, in eval mode.

    ``pretrained=True`` takes the published weights (the shipped fp16 ones for the reference models);
    ``checkpoint_path`` loads a local checkpoint instead (see the module docstring for the layouts).
    ``kwargs`` go to ``timm.create_model`` (``num_classes``, ``img_size``, ``pretrained_cfg_overlay``...). The
    model records its name and ``kwargs`` (:func:`~adfq_lightning.recipe.model_recipe`), so that an export of it
    builds it again.
    """
    _check_known(name)
    if is_reference_model(name):
        model = create_reference_model(name, pretrained=pretrained and not checkpoint_path)
    else:
        if pretrained and not checkpoint_path:
            _check_pretrained_reachable(name, kwargs)
        try:
            model = timm.create_model(name, pretrained=pretrained and not checkpoint_path, **kwargs)
        except (OSError, ConnectionError) as err:  # the hub failed after the check above passed
            raise RuntimeError(f"could not fetch pretrained weights for {name!r} ({type(err).__name__}: {err}). "
                               f"{OFFLINE_HELP}") from err
    if checkpoint_path:
        _load_checkpoint(model, name, checkpoint_path, kwargs)
    elif not pretrained:
        warnings.warn(f"{name} has RANDOM weights (pretrained: false and no checkpoint_path): its quantized accuracy "
                      "means nothing. Set pretrained: true, or checkpoint_path: <your checkpoint>.",
                      RandomWeightsWarning, stacklevel=2)
    return record_build(model, name, kwargs).eval()
