"""What a quantized weight IS, independent of how it was found: integer codes plus the qparams that
map them back to values. Every exporter (packed, compressed-tensors, GGUF, dense) packs exactly this,
and every quantizer's forward computes its values through `dequantize` below, so what ships is what
the student computed with, bit for bit on the CPU in fp32.

Two kinds of grid:
  affine    w = (code - zero) * scale, codes qmin..qmax (int grids, binary, SEQ's levels).
            zero: the per-group tensor of an asymmetric grid (learned or MinMax), else the grid's
            fixed zero (0 for symmetric int grids, 0.5 for binary {0, 1} -> {-s, +s} with scale 2s,
            -0.5 for SEQ 2-bit {-2..1} -> {-1.5, -0.5, 0.5, 1.5} x scale).
  codebook  w = table[code] * (scale_neg if table[code] < 0 else scale_pos)   (normal-float grids)

Shapes for a weight (out, in) with G groups per row of `group_size` columns:
  codes  (out, in) int16
  scale  (rows, G) float32, rows = out (1 for a single per-tensor scale); codebook: (rows, G, 2)
  zero   (rows, G) float32 in code units, or None (use grid.fixed_zero)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qatlab.quantizers.nf_grid import nf_codebook


@dataclass(frozen=True)
class Grid:
    kind: str  # "affine" | "codebook"
    bits: int  # bits per stored code
    qmin: int  # smallest code (affine) / 0 (codebook)
    qmax: int  # largest code (affine) / 2^bits - 1 (codebook)
    label: str  # e.g. "int4 sym full", "seq2", "nf3": reports and refusal messages
    fixed_zero: float = 0.0  # affine grids without a per-group zero tensor
    nf_bits: int | None = None  # codebook grids: the NF codebook of this width

    @property
    def integer_codes(self) -> bool:
        """True when values are integer multiples of the scale around an integer zero (engines' int grids)."""
        return self.kind == "affine" and float(self.fixed_zero).is_integer()


@dataclass
class QuantizedWeight:
    codes: Tensor  # (out, in) int16
    scale: Tensor  # (rows, G) or (rows, G, 2) float32
    zero: Tensor | None  # (rows, G) float32 or None
    grid: Grid
    group_size: int  # columns per group; in_features for per-channel, out * in for per-tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def unsigned_codes(self) -> Tensor:
        """codes - qmin, in [0, 2^bits): what bit packing stores."""
        return (self.codes.to(torch.int32) - self.grid.qmin).to(torch.int16)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(out, in) values in dtype; the float32 arithmetic every quantizer's forward uses."""
        return dequantize(self.codes, self.scale, self.zero, self.grid).to(dtype)


def grouped(t: Tensor, scale: Tensor) -> Tensor:
    """(out, in) -> (rows, G, columns per group), the layout `scale` (rows, G[, 2]) broadcasts over."""
    return t.reshape(scale.shape[0], scale.shape[1], -1)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor | None, grid: Grid) -> Tensor:
    """float32 values of `codes` (any shape whose elements tile `scale`'s groups), in codes' shape."""
    c = grouped(codes, scale)
    if grid.kind == "codebook":
        v = nf_codebook(grid.nf_bits, codes.device)[c.long()]
        x = v * torch.where(v < 0, scale[..., :1], scale[..., 1:])
    else:
        z = zero.float()[..., None] if zero is not None else grid.fixed_zero
        x = (c.float() - z) * scale.float()[..., None]
    return x.reshape(codes.shape)
