"""Quantized Swin window attention (relative position bias, shifted-window mask)."""

from __future__ import annotations

from typing import Optional

import torch
from timm.models.swin_transformer import WindowAttention

from ..config import ADFQConfig
from .attention import QuantizedProjections
from .registry import register


@register(WindowAttention)
class QuantWindowAttention(QuantizedProjections):
    """timm ``swin_transformer.WindowAttention`` with signature ``(x, mask)``, x of shape (windows*B, N, C)."""

    def __init__(self, attn: WindowAttention, config: ADFQConfig, name: str) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.window_size, self.window_area = attn.window_size, attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self._wrap_projections(attn, config, name)

    @classmethod
    def from_float(cls, module: WindowAttention, config: ADFQConfig, name: str) -> "QuantWindowAttention":
        return cls(module, config, name)

    def _relative_position_bias(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = self.matmul_qk(q * self.scale, k.transpose(-2, -1)) + self._relative_position_bias()
        if mask is not None:
            num_win = mask.shape[0]
            scores = scores.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            scores = scores.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self._probabilities(scores))
        x = self.matmul_av(attn, v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))
