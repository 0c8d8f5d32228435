"""Integer weight codes on disk: two 2-4-bit codes per byte, one 5-8-bit code per byte."""

from __future__ import annotations

import torch

__all__ = ["pack_codes", "unpack_codes"]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten uint8 ``codes`` (values < 2**bits) into bytes: for ``bits <= 4`` two per byte (low nibble first;
    2- and 3-bit codes also take a nibble), else one per byte."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits > 4:
        return flat.clone()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`."""
    numel = 1
    for size in shape:
        numel *= size
    if bits > 4:
        flat = packed
    else:
        flat = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    if flat.numel() < numel or flat.numel() > numel + (1 if bits <= 4 else 0):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} {bits}-bit codes: the file is corrupt.")
    return flat[:numel].reshape(shape)
