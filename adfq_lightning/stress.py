"""A function-preserving transform that gives a small ViT the post-LayerNorm outlier channels of ImageNet ViTs.

ImageNet-trained ViTs have a few LayerNorm output channels whose magnitudes are tens of times larger than
the rest; Per-Patch Outlier-aware Quantization (its threshold and per-patch ranges) exists for them. The
small CIFAR-10 reference models have none. :func:`add_outlier_channels` multiplies the LayerNorm weight and
bias of a few channels by ``s`` and divides the matching input columns of the Linear that reads them (qkv,
fc1) by ``s``: the float model computes the same function (up to rounding), but its post-LayerNorm
activations now carry outlier channels. It is a *stress variant* for benchmarks, not a real model.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["add_outlier_channels", "layernorm_linear_pairs"]


def layernorm_linear_pairs(model: nn.Module) -> list[tuple[str, nn.LayerNorm, nn.Linear]]:
    """(name, LayerNorm, the Linear reading its output) for every attention and MLP input of a ViT/DeiT/Swin."""
    blocks = list(getattr(model, "blocks", []))
    for stage in getattr(model, "layers", []):
        blocks += list(stage.blocks)
    pairs = []
    for i, block in enumerate(blocks):
        pairs.append((f"block{i}.norm1", block.norm1, block.attn.qkv))
        pairs.append((f"block{i}.norm2", block.norm2, block.mlp.fc1))
    if not pairs:
        raise TypeError(f"{type(model).__name__} has no timm ViT/Swin blocks with norm1/attn.qkv/norm2/mlp.fc1.")
    return pairs


@torch.no_grad()
def add_outlier_channels(model: nn.Module, images: torch.Tensor, channels: int = 2, magnitude: float = 100.0) -> dict:
    """Turn the ``channels`` largest post-LayerNorm channels of every block into outlier channels, in place.

    The channels are those with the largest mean ``|x|`` on ``images`` (already the largest, as in real
    models); each is scaled by ``s = magnitude / max|x_c|`` so that its largest value becomes ``magnitude``.
    Returns ``{layer: {"channels": [...], "scales": [...]}}``.
    """
    pairs = layernorm_linear_pairs(model)
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(name):
        def hook(_module, _args, out):
            flat = out.detach().abs().reshape(-1, out.shape[-1])
            mean, peak = flat.mean(0), flat.amax(0)
            if name in stats:
                n_mean, n_peak = stats[name]
                mean, peak = mean + n_mean, torch.maximum(peak, n_peak)
            stats[name] = (mean, peak)
        return hook

    handles = [norm.register_forward_hook(observe(name)) for name, norm, _ in pairs]
    try:
        model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    changed = {}
    for name, norm, linear in pairs:
        mean, peak = stats[name]
        chosen = mean.topk(channels).indices
        scales = magnitude / peak[chosen].clamp(min=1e-6)
        norm.weight[chosen] *= scales
        norm.bias[chosen] *= scales
        linear.weight[:, chosen] /= scales
        changed[name] = {"channels": chosen.tolist(), "scales": [round(float(s), 2) for s in scales]}
    return changed
