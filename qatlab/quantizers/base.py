"""WeightQuantizer: the fake-quantizer module a FakeQuantLinear owns (torchao's shape).

A quantizer maps the layer's latent weight to the values the forward pass uses, owns whatever it
learns (LSQ's steps, SEQ's alphas: nn.Parameters, so the optimizer, checkpoints and resume see them
under "<layer>.weight_quantizer.<name>"), and says exactly what ships:

    forward(w)        -> w_hat, same shape and dtype, with the quantizer's gradients (STE, LSQ, ...)
    encode(w)         -> QuantizedWeight (codes + qparams): what every exporter packs, no recomputation
    qparams(w)        -> {"scale": (rows, G), "zero": (rows, G) or absent}: the qparams encode() ships
    storage_bits(shape) -> bits one weight of that shape costs when shipped (codes + fp16 qparams)
    initialize(w)     set learned qparams from the current latent weight (after clip search, GPTQ, ...)
    freeze_codes(w)   keep today's codes fixed from now on; only the qparams still train (E2E-QP)

Invariant, tested for every quantizer: forward(w) == encode(w).dequantize() exactly (fp32, CPU).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from qatlab.errors import require
from qatlab.quantizers.codes import Grid, QuantizedWeight, dequantize, grouped
from qatlab.quantizers.spec import QuantConfig

# factory(spec, weight) -> quantizer for that weight: what `quantize_model` and recipes take.
QuantizerFactory = Callable[[QuantConfig, Tensor], "WeightQuantizer"]

FP16_BITS = 16  # shipped qparams (scales, zero points) are fp16


def scale_shape(spec: QuantConfig, shape: torch.Size | tuple[int, int]) -> tuple[int, int]:
    """(rows, G): how many qparams a weight (out, in) has under spec's granularity."""
    out, width = shape
    if spec.granularity == "tensor":
        return 1, 1
    if spec.granularity == "chunks":  # chunks of the flattened weight: one row of qparams, G of them
        spec.check_numel(out * width)
        return 1, spec.num_groups
    if spec.granularity == "group":
        spec.check_width(width)
        return out, width // spec.group_size
    return out, 1


def group_size_of(spec: QuantConfig, shape: torch.Size | tuple[int, int]) -> int:
    rows, groups = scale_shape(spec, shape)
    return shape[0] * shape[1] // (rows * groups)


class WeightQuantizer(nn.Module):
    """Base class; subclasses implement forward and encode (and initialize if they learn)."""

    def __init__(self, spec: QuantConfig, shape: torch.Size | tuple[int, int]) -> None:
        super().__init__()
        require(len(shape) == 2, f"a weight quantizer takes (out, in) weights, not shape {tuple(shape)}")
        self.spec = spec
        self.shape = torch.Size(shape)
        self.rows, self.groups = scale_shape(spec, self.shape)
        self.group_size = self.shape[0] * self.shape[1] // (self.rows * self.groups)

    # -- what ships -----------------------------------------------------------------------------
    def encode(self, w: Tensor) -> QuantizedWeight:
        raise NotImplementedError

    def qparams(self, w: Tensor) -> dict[str, Tensor]:
        qw = self.encode(w)
        return {"scale": qw.scale} | ({"zero": qw.zero} if qw.zero is not None else {})

    def storage_bits(self, shape: torch.Size | tuple[int, int] | None = None) -> int:
        """Codes plus fp16 qparams: one scale per group, and a zero point when the grid has one per group."""
        out, width = shape or self.shape
        per_scale = 2 if self.has_zero_points else 1
        qparam_count = self.rows * self.groups * (2 if self.spec.nf else per_scale)
        return out * width * self.spec.bits + qparam_count * FP16_BITS

    @property
    def has_zero_points(self) -> bool:
        return not self.spec.symmetric and not self.spec.nf

    # -- training hooks ---------------------------------------------------------------------------
    def initialize(self, w: Tensor) -> None:
        """Learned quantizers reset their qparams from w; stateless ones have nothing to do."""

    def freeze_codes(self, w: Tensor) -> None:
        from qatlab.errors import QatlabError

        raise QatlabError(f"{type(self).__name__} recomputes its qparams from the weight on every forward, so its "
                          "codes cannot be frozen while qparams train; use a learned quantizer (quantizer=lsq, "
                          "efficientqat, seq)")

    def describe(self) -> str:
        return self.spec.describe()

    def extra_repr(self) -> str:
        return f"{self.describe()}, shape={tuple(self.shape)}"


class FrozenCodes(nn.Module):
    """Codes kept fixed after `freeze_codes`: (out, in) int16 buffer (EfficientQAT's E2E-QP trains only
    the scales of a packed model; here the codes stay, the latent weight is ignored)."""

    def __init__(self, codes: Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int16))


def affine_grid(spec: QuantConfig, label: str | None = None, fixed_zero: float = 0.0) -> Grid:
    return Grid("affine", spec.bits, spec.qmin, spec.qmax, label or spec.describe(), fixed_zero)


def affine_values(codes_g: Tensor, scale: Tensor, zero: Tensor | None, fixed_zero: float = 0.0) -> Tensor:
    """(R, g) float codes of a grouped view -> values, with (R, 1) scale / zero: the float32 arithmetic
    of qatlab.quantizers.codes.dequantize, so forward and encode agree bit for bit."""
    z = zero if zero is not None else fixed_zero
    return (codes_g - z) * scale


__all__ = ["WeightQuantizer", "QuantizerFactory", "FrozenCodes", "affine_grid", "affine_values", "scale_shape",
           "group_size_of", "dequantize", "grouped"]
