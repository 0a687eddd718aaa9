"""quantizer=onebit: OneBit's layer (Xu et al. 2024) instead of a fake-quantizer module.

OneBit does not fake-quantize W: every chosen Linear becomes a OneBitLinear, Y = LayerNorm([(X * g)
sign(W)^T] * h) + bias (qatlab.layers.onebit_linear). It still answers the same questions a
quantized layer does (storage_bits, its qparams-like parameters g and h, its packed export), so
recipes, bits per weight and export treat it like any other quantized layer.
"""

from __future__ import annotations

from torch import nn

from qatlab.errors import require
from qatlab.layers.onebit_linear import SURROGATES, OneBitLinear
from qatlab.quantizers.spec import QuantConfig


class OneBitLayers:
    """A layer factory: layer(name, linear, spec, act_spec) -> OneBitLinear sharing linear's Parameters."""

    def __init__(self, *, surrogate: str = "tanh", norm_affine: bool = False, norm_eps: float = 1e-5) -> None:
        require(surrogate in SURROGATES, f"quantizer.surrogate='{surrogate}' is not known; use one of {list(SURROGATES)}")
        require(isinstance(norm_eps, (int, float)) and norm_eps > 0, f"quantizer.norm_eps={norm_eps!r} must be > 0 (e.g. 1e-5)")
        self.options = {"surrogate": surrogate, "norm_affine": bool(norm_affine), "norm_eps": float(norm_eps)}

    def layer(self, name: str, linear: nn.Linear, spec: QuantConfig | None, act: QuantConfig | None) -> OneBitLinear:
        require(spec is not None and spec.bits == 1 and spec.symmetric,
                "quantizer=onebit makes 1-bit sign layers: keep method.weight {bits: 1, symmetric: true} "
                "(it also sets the RTN baseline row: sign(W) x mean|W| per channel)")
        require(act is None, "quantizer=onebit is weight-only (W1A16); set method.activation=null")
        return OneBitLinear.from_linear(linear, name, **self.options)

    def describe(self) -> str:
        return "onebit(" + ", ".join(f"{k}={v}" for k, v in self.options.items()) + ")"
