"""Quantized ViT/DeiT attention with an explicit (non-SDPA) score path so the softmax can be quantized."""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import Attention
from torch import nn

from ..config import ADFQConfig
from .factory import activation_quantizer
from .linear import QuantLinear
from .matmul import QuantMatMul
from .registry import UnsupportedModuleError, register
from .attention_scores import AttentionScores


class QuantizedProjections(AttentionScores):
    """What every quantized attention holds: quantized qkv/proj, the two quantized products, the float dropouts."""

    def _wrap_projections(self, attn: nn.Module, config: ADFQConfig, name: str) -> None:
        """Quantized qkv/proj share the float weights."""
        self.qkv = QuantLinear(attn.qkv, config, f"{name}.qkv", role="qkv_input")
        self.proj = QuantLinear(attn.proj, config, f"{name}.proj", role="proj_input")
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.matmul_qk = QuantMatMul(activation_quantizer(config, name, "q"), activation_quantizer(config, name, "k"))
        self.matmul_av = QuantMatMul(activation_quantizer(config, name, "attn_probs"),
                                     activation_quantizer(config, name, "v"))


@register(Attention)
class QuantAttention(QuantizedProjections):
    """timm ``vision_transformer.Attention`` (ViT, DeiT), same signature ``(x, attn_mask, is_causal)``."""

    def __init__(self, attn: Attention, config: ADFQConfig, name: str) -> None:
        super().__init__()
        if attn.gate is not None:
            raise UnsupportedModuleError(f"{name}: gated timm Attention is not supported by the quantized wrapper.")
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        self.scale = attn.scale
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self._wrap_projections(attn, config, name)

    @classmethod
    def from_float(cls, module: Attention, config: ADFQConfig, name: str) -> "QuantAttention":
        return cls(module, config, name)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        scores = self.matmul_qk(q * self.scale, k.transpose(-2, -1))
        scores = maybe_add_mask(scores, resolve_self_attn_mask(N, scores, attn_mask, is_causal))
        attn = self.attn_drop(self._probabilities(scores))
        x = self.matmul_av(attn, v).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))
