"""Quantized layers and the swapping that installs them in any HF causal LM (no forked modeling code)."""

from qatlab.layers.fake_linear import FakeQuantLinear
from qatlab.layers.onebit_linear import OneBitLinear
from qatlab.layers.swap import find_linears, quantize_model, set_quant_enabled, swap_linears, unswap

__all__ = ["FakeQuantLinear", "OneBitLinear", "find_linears", "swap_linears", "quantize_model", "unswap",
           "set_quant_enabled"]
