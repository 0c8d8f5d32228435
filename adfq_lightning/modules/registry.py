"""The float -> quantized module registry and the model conversion that uses it."""

from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

from ..config import ADFQConfig
from ..quantizers import activation_quantizers
from .attention_scores import AttentionScores

T = TypeVar("T", bound=type)

#: float class -> quantized class. Exact types: a subclass may change ``forward`` and must be registered itself.
QUANTIZED_MODULES: dict[type, type] = {}


class UnsupportedModuleError(TypeError):
    """A model holds a module the quantized wrappers cannot reproduce faithfully."""


def register(float_cls: type) -> Callable[[T], T]:
    """Class decorator: quantize every ``float_cls`` module with the decorated class.

    The quantized class needs ``from_float(module, config, name)`` returning the replacement module. Use it
    to support your own attention variant::

        @adfq_lightning.register(MyAttention)
        class QuantMyAttention(nn.Module): ...
    """

    def decorator(quant_cls: T) -> T:
        if not callable(getattr(quant_cls, "from_float", None)):
            raise TypeError(f"{quant_cls.__name__} needs a classmethod from_float(module, config, name).")
        QUANTIZED_MODULES[float_cls] = quant_cls
        return quant_cls

    return decorator


def is_quantized(module: nn.Module) -> bool:
    return type(module) in QUANTIZED_MODULES.values()


def is_converted(model: nn.Module) -> bool:
    """True once ``model`` holds quantized modules (after :func:`convert`)."""
    return any(is_quantized(m) for m in model.modules())


def is_calibrated(model: nn.Module) -> bool:
    """True once a converted model's activation quantizers all hold calibrated (or loaded) parameters."""
    acts = activation_quantizers(model)
    return bool(acts) and all(bool(q.calibrated) for q in acts)


def _unsupported_attention(model: nn.Module, swapped: set[int]) -> list[str]:
    """Attention-like modules that would stay in float: their scores would silently escape quantization.

    Attention-like: a class named ``*attention*`` with parameters, or a subclass of a registered float
    attention class (registration is by exact type, so the subclass itself is not converted).
    """
    attention_classes = tuple(f for f, q in QUANTIZED_MODULES.items() if issubclass(q, AttentionScores))
    return [
        f"{name} ({type(m).__module__}.{type(m).__qualname__})"
        for name, m in model.named_modules()
        if id(m) not in swapped and not is_quantized(m) and (
            isinstance(m, attention_classes)
            or ("attention" in type(m).__name__.lower() and any(True for _ in m.parameters())))
    ]


def convert(model: nn.Module, config: ADFQConfig) -> nn.Module:
    """Swap every registered float module of ``model`` (in place) for its quantized counterpart.

    All replacements are built and every check is made before the first swap, so a model that cannot be
    converted is left exactly as it was.
    """
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    _collect_swaps(model, config, "", swaps)
    if not swaps:
        supported = ", ".join(sorted(f"{c.__module__}.{c.__qualname__}" for c in QUANTIZED_MODULES))
        raise UnsupportedModuleError(
            f"{type(model).__name__} has no module adfq-lightning can quantize (supported: {supported}). "
            "Pass a timm ViT/DeiT/Swin, or register a quantized class with adfq_lightning.register()."
        )
    leftovers = _unsupported_attention(model, {id(getattr(parent, child)) for parent, child, _ in swaps})
    if leftovers:
        raise UnsupportedModuleError(
            "these attention modules have no quantized wrapper: " + "; ".join(leftovers) + ". Supported are timm's "
            "vision_transformer.Attention and swin_transformer.WindowAttention; register a quantized class for "
            "this variant with adfq_lightning.register(<its class>)."
        )
    for parent, child_name, quantized in swaps:
        setattr(parent, child_name, quantized)
    return model


def _collect_swaps(module: nn.Module, config: ADFQConfig, prefix: str,
                   swaps: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        quant_cls = QUANTIZED_MODULES.get(type(child))
        if quant_cls is not None:
            swaps.append((module, child_name, quant_cls.from_float(child, config, name)))
        elif not is_quantized(child):
            _collect_swaps(child, config, f"{name}.", swaps)
