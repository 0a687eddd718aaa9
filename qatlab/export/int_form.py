"""A layer's codes in the form inference engines store: integer codes per row, one scale per group of columns.

Engines (compressed-tensors, GGUF) store w = (q - zero) * scale with q an integer, `scale` one per group of
consecutive columns of a row, and zero 0 (symmetric grids) or one per group. qatlab's QuantizedWeight is more
general (one row of qparams for per-tensor and `chunks` layouts, half-integer fixed zeros, NF codebooks);
`int_form` rewrites it into the engine form WITHOUT changing a single value, or says why it cannot:

  rows = 1 layouts   a chunk of the flattened weight that tiles whole rows (chunk % in == 0) repeats its scale on
                     each of those rows (per channel); one that tiles a row (in % chunk == 0) is a group of columns;
                     a chunk that ends mid-row has no engine form
  fixed zero f       integer f: q = code - f; half-integer f (binary {0, 1} -> +-s/2 x 2, SEQ's {-1.5 .. 1.5}):
                     q = 2 code - 2 f with scale / 2, the same real value, so the same fp32 product
  codebook (NF)      no engine form: its levels are not evenly spaced

Nothing here rounds: the caller decides what its format does to the scales (fp16 in GGUF blocks, export_dtype in
compressed-tensors) and states it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qatlab.quantizers.codes import QuantizedWeight


@dataclass
class IntForm:
    q: Tensor  # (out, in) int32 integer codes
    scale: Tensor  # (out, in // group) float32
    zero: Tensor | None  # (out, in // group) float32 in code units, None: zero 0 (a symmetric grid)
    group: int  # columns per group; in_features: one scale per row (per channel)
    lo: int  # the smallest code the grid allows (not only the ones this weight uses)
    hi: int  # the largest
    label: str  # the grid, for messages ("4-bit sym full group32")

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    @property
    def per_channel(self) -> bool:
        return self.group == self.in_features

    def integral_zero(self) -> bool:
        return self.zero is None or bool((self.zero == self.zero.round()).all())

    def per_block(self, block: int) -> tuple[Tensor, Tensor | None]:
        """(scale, zero) repeated to one per `block` columns, (out, in // block); needs group % block == 0."""
        reps = self.group // block
        zero = None if self.zero is None else self.zero.repeat_interleave(reps, dim=1)
        return self.scale.repeat_interleave(reps, dim=1), zero

    def permute_rows(self, order: Tensor) -> IntForm:
        """The same weight with its rows (output channels) reordered (llama.cpp's q/k layout)."""
        return IntForm(self.q[order], self.scale[order], None if self.zero is None else self.zero[order], self.group,
                       self.lo, self.hi, self.label)

    def dequantize(self) -> Tensor:
        """(out, in) float32: the values (what the student computes with, bit for bit)."""
        q = self.q.float().reshape(self.q.shape[0], -1, self.group)
        if self.zero is not None:
            q = q - self.zero[..., None]
        return (q * self.scale[..., None]).reshape(self.q.shape)


def int_form(qw: QuantizedWeight) -> IntForm | str:
    """The engine form of `qw`, or one sentence saying why it has none."""
    grid = qw.grid
    if grid.kind != "affine":
        return f"its {grid.label} grid is a normal-float codebook (levels not evenly spaced), which no integer format stores"
    out, width = qw.codes.shape
    rows, groups = qw.scale.shape[:2]
    scale, zero = qw.scale.float(), None if qw.zero is None else qw.zero.float()
    if rows == out:
        group = width // groups
    else:  # one row of qparams: per tensor, or chunks of the flattened weight
        chunk = qw.group_size
        if chunk % width == 0:  # each chunk covers chunk // width whole rows
            scale = scale.reshape(-1).repeat_interleave(chunk // width)[:, None]
            zero = None if zero is None else zero.reshape(-1).repeat_interleave(chunk // width)[:, None]
            group = width
        elif width % chunk == 0:  # each row holds width // chunk chunks
            scale = scale.reshape(out, width // chunk)
            zero = None if zero is None else zero.reshape(out, width // chunk)
            group = chunk
        else:
            return (f"its chunks of {chunk} flattened weights end mid-row (rows of {width}), so no per-row group "
                    "layout holds its scales")
    codes = qw.codes.to(torch.int32)
    lo, hi = grid.qmin, grid.qmax
    if zero is None and grid.fixed_zero != 0:
        fixed = float(grid.fixed_zero)
        if fixed.is_integer():
            f = int(fixed)
            codes, lo, hi = codes - f, lo - f, hi - f
        elif (2 * fixed).is_integer():  # (c - f) * s == (2c - 2f) * (s / 2) exactly: halving a float is exact
            f2 = int(2 * fixed)
            codes, lo, hi, scale = 2 * codes - f2, 2 * lo - f2, 2 * hi - f2, scale / 2
        else:
            return f"its grid {grid.label} has a fixed zero {fixed}, which no integer grid holds"
    return IntForm(codes, scale.contiguous(), None if zero is None else zero.contiguous(), group, lo, hi, grid.label)
