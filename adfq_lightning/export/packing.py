"""Integer weight codes on disk, packed densely: ``n`` codes of ``b`` bits take ``ceil(n * b / 8)`` bytes, so a
3-bit layer is 3/8 of its 8-bit size and a mix of widths is as small as its average width.

The bit stream is little-endian: code ``i`` occupies bits ``i*b .. i*b + b - 1``, lowest bit first. At 4 bits
that is two codes a byte, low nibble first; at 8 bits one code a byte. Files written before dense packing
(artifact format 1) kept 2- and 3-bit codes in nibbles and 5- to 7-bit codes in bytes: :func:`unpack_codes`
reads them with ``dense=False``.
"""

from __future__ import annotations

import torch

__all__ = ["pack_codes", "packed_size", "unpack_codes"]

_CHUNK = 1 << 20  # codes per step (a multiple of 8, so every chunk ends on a byte boundary)


def packed_size(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take when packed."""
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` (values below ``2**bits``) as a dense little-endian bit stream of uint8."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    weights = 1 << torch.arange(8, dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8)
    out = []
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        stream = ((chunk[:, None] >> shifts) & 1).reshape(-1)
        stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
        out.append((stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8))
    return torch.cat(out) if out else flat.new_zeros(0)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...], dense: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_codes` (``dense=False``: the nibble/byte layout of format-1 artifacts)."""
    numel = 1
    for size in shape:
        numel *= size
    expected = packed_size(numel, bits) if dense else (numel + 1) // 2 if bits <= 4 else numel
    if packed.numel() != expected:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} {bits}-bit codes: the file is corrupt.")
    packed = packed.to(torch.uint8)
    if not dense and bits <= 4:
        return torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel].reshape(shape)
    if not dense or bits == 8:
        return packed.clone().reshape(shape)
    stream = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: numel * bits]
    weights = 1 << torch.arange(bits, dtype=torch.uint8)
    return (stream.reshape(numel, bits) * weights).sum(dim=1, dtype=torch.uint8).reshape(shape)
