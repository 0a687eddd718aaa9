"""Quantization core: configs, fake-quant math, FakeQuantLinear and module swapping."""

from qatlab.quant.config import QuantConfig
from qatlab.quant.fake_linear import FakeQuantLinear
from qatlab.quant.onebit_linear import OneBitLinear
from qatlab.quant.primitives import dequantize, fake_quantize, quantize, round_ste
from qatlab.quant.swap import find_linears, quantize_model, set_quant_enabled, swap_linears, unswap

__all__ = [
    "QuantConfig",
    "FakeQuantLinear",
    "OneBitLinear",
    "fake_quantize",
    "quantize",
    "dequantize",
    "round_ste",
    "find_linears",
    "swap_linears",
    "quantize_model",
    "unswap",
    "set_quant_enabled",
]
