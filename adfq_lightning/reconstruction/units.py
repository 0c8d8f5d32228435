"""Split a timm ViT/DeiT/Swin into the chain of residual units that calibration carries its cache along."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..modules import UnsupportedModuleError, is_quantized


class _Captured(Exception):
    def __init__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.module, self.args_, self.kwargs_ = module, args, kwargs


def run_until(run: Callable[[torch.Tensor], Any], stop_at: nn.Module, x: torch.Tensor) -> tuple[tuple, dict]:
    """Run ``run(x)`` only until ``stop_at`` is called; return the arguments it was called with."""

    def hook(module, args, kwargs):
        raise _Captured(module, args, kwargs)

    handle = stop_at.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run(x)
    except _Captured as captured:
        if captured.module is not stop_at:  # a nested run_until's stop: not ours
            raise
        return captured.args_, captured.kwargs_
    finally:
        handle.remove()
    raise RuntimeError(f"{type(stop_at).__name__} was not called by the forward pass.")


@dataclass
class Unit:
    """One link of the chain: ``run`` maps the cached input to the input of the next unit."""

    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    targets: list[tuple[str, nn.Module]] = field(default_factory=list)


def _residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    if isinstance(model, SwinTransformer):
        chain = []
        for i, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                chain.append((f"layers.{i}.downsample", stage.downsample))
            chain += [(f"layers.{i}.blocks.{j}", b) for j, b in enumerate(stage.blocks)]
        return chain
    raise UnsupportedModuleError(
        f"{type(model).__name__} is not a Vision Transformer adfq-lightning can calibrate: use a timm "
        "VisionTransformer (ViT, DeiT) or SwinTransformer model."
    )


def check_supported(model: nn.Module) -> None:
    """Fail early, before any module is swapped, for a model that is not a timm ViT/DeiT/Swin."""
    _residual_blocks(model)


def reconstruction_targets(model: nn.Module) -> dict[nn.Module, str]:
    """Outermost quantized modules (attention, MLP, stand-alone Linear/Conv): the units of reconstruction."""
    targets: dict[nn.Module, str] = {}
    inside: list[str] = []
    for name, m in model.named_modules():
        if is_quantized(m) and not any(name.startswith(p + ".") for p in inside):
            targets[m] = name
            inside.append(name)
    return targets


def build_units(model: nn.Module, example: torch.Tensor) -> list[Unit]:
    """Prefix (images -> first block input), every residual block, suffix (last block output -> logits).

    ``example`` (one image) is run once to record which targets each unit calls, in call order.
    """
    blocks = _residual_blocks(model)
    first = blocks[0][1]
    units = [Unit("stem", lambda x: run_until(model, first, x)[0][0])]
    units += [Unit(name, block) for name, block in blocks]
    units.append(Unit("head", lambda x: model.forward_head(model.norm(x))))

    targets = reconstruction_targets(model)
    order: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda mod, _a: order.append(mod)) for m in targets]
    try:
        x = example
        with torch.no_grad():
            for unit in units:
                start = len(order)
                x = unit.run(x)
                unit.targets = [(targets[m], m) for m in dict.fromkeys(order[start:])]
    finally:
        for h in handles:
            h.remove()
    return units
