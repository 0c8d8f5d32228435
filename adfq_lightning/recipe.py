"""What a quantized model carries about itself: the ``ADFQConfig`` it was made with, its timm architecture and the
arguments that build it again.

timm does not record the arguments of ``timm.create_model``: :func:`~adfq_lightning.models.create_model` records
them where it builds the model, and for a model built any other way they are read off its structure (image and
patch size, width, depth, heads, classes, window size). The recipe is a plain attribute of the model: it is not
in its ``state_dict`` and takes no part in its computation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from torch import nn

from .config import ADFQConfig

__all__ = ["ModelRecipe", "display_name", "model_recipe", "record_build"]

RECIPE_ATTR = "adfq_recipe"

#: timm entry points whose defaults every structural argument below overrides
_BASE_ARCHITECTURES = {"VisionTransformer": "vit_base_patch16_224",
                       "VisionTransformerDistilled": "deit_base_distilled_patch16_224",
                       "SwinTransformer": "swin_tiny_patch4_window7_224"}


@dataclass(frozen=True)
class ModelRecipe:
    """How a quantized model was made.

    Attributes:
        architecture: the timm (or reference) model name that :func:`~adfq_lightning.models.create_model` builds.
        model_kwargs: the arguments that build this exact model (``img_size``, ``num_classes``...).
        recorded: True when ``architecture`` and ``model_kwargs`` were recorded where the model was built, False
            when they were read off its structure.
        config: the quantization recipe (None until :func:`~adfq_lightning.prepare` converts the model).
    """

    architecture: Optional[str]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    recorded: bool = False
    config: Optional[ADFQConfig] = None


def record_build(model: nn.Module, architecture: str, model_kwargs: dict[str, Any]) -> nn.Module:
    """Record the name and arguments ``model`` was built with (where the project builds it)."""
    object.__setattr__(model, RECIPE_ATTR, ModelRecipe(architecture, plain(model_kwargs), recorded=True))
    return model


def model_recipe(model: nn.Module) -> Optional[ModelRecipe]:
    """The recipe a model carries (set when it was built by :func:`~adfq_lightning.models.create_model` or
    prepared by :func:`~adfq_lightning.prepare`), else None."""
    recipe = getattr(model, RECIPE_ATTR, None)
    return recipe if isinstance(recipe, ModelRecipe) else None


def display_name(model: nn.Module) -> str:
    """The name a report gives the model: the one it was built by, timm's architecture, or its class."""
    recipe = model_recipe(model)
    if recipe is not None and recipe.recorded:
        return recipe.architecture
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def attach_config(model: nn.Module, config: ADFQConfig) -> ModelRecipe:
    """Give ``model`` its quantization recipe; the architecture and arguments are inferred if none were recorded
    (call before the modules are swapped: the float structure is read)."""
    recipe = model_recipe(model) or infer_recipe(model)
    recipe = replace(recipe, config=config)
    object.__setattr__(model, RECIPE_ATTR, recipe)
    return recipe


def plain(value: Any) -> Any:
    """JSON-like form of constructor arguments: tuples as lists, a square ``(n, n)`` as ``n``."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


def same_argument(a: Any, b: Any) -> bool:
    """Whether two constructor arguments build the same thing (``32`` and ``(32, 32)`` do)."""
    a, b = plain(a), plain(b)
    if isinstance(a, list) and len(a) == 2 and a[0] == a[1] and not isinstance(b, list):
        a = a[0]
    if isinstance(b, list) and len(b) == 2 and b[0] == b[1] and not isinstance(a, list):
        b = b[0]
    return a == b


def _square(size: Any) -> Any:
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return int(size[0]) if size[0] == size[1] else [int(s) for s in size]


def _is(module: Optional[nn.Module], cls_name: str) -> bool:
    return module is not None and type(module).__name__ == cls_name


def _vit_kwargs(model: nn.Module) -> dict[str, Any]:
    block, embed = model.blocks[0], model.patch_embed
    kwargs = {"img_size": _square(embed.img_size), "patch_size": _square(embed.patch_size),
              "in_chans": embed.proj.in_channels, "num_classes": model.num_classes, "global_pool": model.global_pool,
              "embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": block.attn.num_heads,
              "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim, "qkv_bias": block.attn.qkv.bias is not None,
              "class_token": model.cls_token is not None, "no_embed_class": bool(model.no_embed_class),
              "reg_tokens": int(getattr(model, "num_reg_tokens", 0))}
    if _is(getattr(block, "ls1", None), "LayerScale"):
        kwargs["init_values"] = 1e-5  # the factor itself is a parameter: loaded, whatever its start
    if not _is(getattr(model, "norm_pre", None), "Identity"):
        kwargs["pre_norm"] = True
    if not _is(getattr(model, "fc_norm", None), "Identity"):
        kwargs["fc_norm"] = True
    if not _is(getattr(block.attn, "q_norm", None), "Identity") and hasattr(block.attn, "q_norm"):
        kwargs["qk_norm"] = True
    return kwargs


def _swin_kwargs(model: nn.Module) -> dict[str, Any]:
    embed, first = model.patch_embed, model.layers[0].blocks[0]
    head = getattr(model, "head", None)
    pool = getattr(getattr(head, "global_pool", None), "pool_type", None) or getattr(model, "global_pool", "avg")
    return {"img_size": _square(embed.img_size), "patch_size": _square(embed.patch_size),
            "in_chans": embed.proj.in_channels, "num_classes": model.num_classes, "global_pool": pool,
            "embed_dim": int(model.embed_dim if isinstance(model.embed_dim, int) else model.embed_dim[0]),
            "depths": [len(layer.blocks) for layer in model.layers],
            "num_heads": [layer.blocks[0].attn.num_heads for layer in model.layers],
            "window_size": _square(first.window_size), "mlp_ratio": first.mlp.fc1.out_features / first.mlp.fc1.in_features,
            "qkv_bias": first.attn.qkv.bias is not None}


def infer_recipe(model: nn.Module) -> ModelRecipe:
    """Architecture and constructor arguments read off a float timm ViT/DeiT/Swin (architecture None for a model
    whose structure is not a timm one)."""
    kind = next((c.__name__ for c in type(model).__mro__ if c.__name__ in _BASE_ARCHITECTURES), None)
    if kind is None:
        return ModelRecipe(None)
    named = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    try:
        kwargs = _swin_kwargs(model) if kind == "SwinTransformer" else _vit_kwargs(model)
    except (AttributeError, IndexError, TypeError):  # a variant laid out otherwise: only its name is known
        return ModelRecipe(named)
    return ModelRecipe(named or _BASE_ARCHITECTURES[kind], kwargs)
