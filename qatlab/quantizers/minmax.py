"""MinMax quantizers: the qparams are recomputed from the latent weight on every forward (RTN's grid,
and what LLM-QAT, BitDistiller, ZeroQuant and GPTQ train or solve against). No parameters.

  MinMax       int grids: symmetric (restricted or full range) or asymmetric (scale + zero point)
  NormalFloat  NF codebooks (BitDistiller's NF3, QLoRA's NF4), two half-scales per group
  Binary       sign(w) x mean|w| per group (BWN / XNOR-Net); the OneBit recipe's RTN row

The math is qatlab.quantizers.primitives (pure functions + the STE Function); these modules hold the
spec and answer the quantizer interface (encode, qparams, storage_bits).
`minmax(spec, weight)` picks the class the spec describes: it is the default quantizer factory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qatlab.quantizers.base import WeightQuantizer, affine_grid
from qatlab.quantizers.codes import Grid, QuantizedWeight
from qatlab.errors import require
from qatlab.quantizers.primitives import fake_quantize, fake_quantize_scale_grad, quantize
from qatlab.quantizers.spec import QuantConfig


class MinMax(WeightQuantizer):
    """Any MinMax int grid (the spec's bits, symmetry, range, granularity); no parameters.

    scale_grad=True: the gradient also flows through the scale (the group's min/max are not detached), as
    BitDistiller's quantizers do; the values are the same either way."""

    def __init__(self, spec: QuantConfig, weight: Tensor, *, scale_grad: bool = False) -> None:
        super().__init__(spec, weight.shape)
        require(isinstance(scale_grad, bool), f"quantizer.scale_grad={scale_grad!r} must be true or false")
        self.scale_grad = scale_grad

    def forward(self, w: Tensor) -> Tensor:
        return fake_quantize_scale_grad(w, self.spec) if self.scale_grad else fake_quantize(w, self.spec)

    def describe(self) -> str:
        return self.spec.describe() + (" (gradient through the scale)" if self.scale_grad else "")

    def grid(self) -> Grid:
        return affine_grid(self.spec)

    @torch.no_grad()
    def encode(self, w: Tensor) -> QuantizedWeight:
        codes, scale, zero = quantize(w, self.spec)  # (R, g) codes, (R, 1 | 2) scale, (R, 1) zero | None
        halves = (2,) if self.spec.nf else ()  # NF: the negative and the positive half's scale
        return QuantizedWeight(
            codes=codes.to(torch.int16).reshape(w.shape),
            scale=scale.reshape(self.rows, self.groups, *halves),
            zero=None if zero is None else zero.reshape(self.rows, self.groups),
            grid=self.grid(),
            group_size=self.group_size,
        )


class NormalFloat(MinMax):
    """NF codebook grid: codes are indices into the 2^bits-value table; scale (rows, G, 2)."""

    def grid(self) -> Grid:
        return Grid("codebook", self.spec.bits, 0, 2**self.spec.bits - 1, self.spec.describe(), nf_bits=self.spec.bits)


class Binary(MinMax):
    """{-s, +s} with s = mean|w| per group; shipped as codes {0, 1} on the affine grid (c - 0.5) * 2s."""

    def grid(self) -> Grid:
        return affine_grid(self.spec, fixed_zero=0.5)

    @torch.no_grad()
    def encode(self, w: Tensor) -> QuantizedWeight:
        qw = super().encode(w)
        qw.scale = qw.scale * 2  # (c - 0.5) * 2s == (2c - 1) * s exactly: the same values the forward gives
        return qw


def minmax(spec: QuantConfig, weight: Tensor, *, scale_grad: bool = False) -> MinMax:
    """The MinMax quantizer `spec` describes (the default factory: `quantizer=minmax`)."""
    if spec.nf:
        return NormalFloat(spec, weight, scale_grad=scale_grad)
    if spec.binary:
        require(not scale_grad, "quantizer.scale_grad applies to int and NF grids, not 1-bit")
        return Binary(spec, weight)
    return MinMax(spec, weight, scale_grad=scale_grad)
