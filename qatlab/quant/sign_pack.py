"""Pack ±1 signs 8 per byte (uint8) and back.

Layout: along the last dim, element 8j + k is bit k (least significant first) of byte j; bit 1
means +1 (w >= 0), bit 0 means -1. A last dim that is not a multiple of 8 is padded with 0 bits;
unpack needs the true length to drop them.
"""

from __future__ import annotations

import torch
from torch import Tensor

_BITS = 8


def _powers(device: torch.device) -> Tensor:
    return (2 ** torch.arange(_BITS, device=device)).to(torch.uint8)  # [1, 2, 4, ..., 128]


def pack_signs(signs: Tensor) -> Tensor:
    """(..., n) with entries >= 0 read as +1, < 0 as -1 -> (..., ceil(n / 8)) uint8."""
    bits = (signs >= 0).to(torch.uint8)
    n = bits.shape[-1]
    pad = -n % _BITS
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*bits.shape[:-1], -1, _BITS)  # (..., bytes, 8)
    return (bits * _powers(bits.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(..., bytes) uint8 -> (..., n) of ±1 in dtype."""
    bits = (packed.unsqueeze(-1) & _powers(packed.device)) != 0  # (..., bytes, 8)
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :n]
    return torch.where(bits, 1.0, -1.0).to(dtype)
