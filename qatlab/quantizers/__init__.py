"""Quantizers: modules that own their parameters and say what they ship (qatlab.quantizers.base).

    QuantConfig       the grid (bits, symmetry, range, granularity): qatlab.quantizers.spec
    minmax            MinMax / NormalFloat / Binary: qparams recomputed every forward (RTN's grid)
    LSQ               learned steps (+ zero points): LSQ, ParetoQ 3/4-bit, EfficientQAT
    SEQ, paretoq      ParetoQ's stretched elastic quantizer (2-bit, ternary) and its by-bits choice
    DynamicQuantizer  per-token activations
A factory is anything called as factory(spec, weight) -> quantizer: conf/quantizer/*.yaml are
`_partial_` targets of these.
"""

from qatlab.quantizers.activation import DynamicQuantizer
from qatlab.quantizers.base import QuantizerFactory, WeightQuantizer
from qatlab.quantizers.codes import Grid, QuantizedWeight
from qatlab.quantizers.lsq import LSQ
from qatlab.quantizers.minmax import Binary, MinMax, NormalFloat, minmax
from qatlab.quantizers.primitives import dequantize, fake_quantize, quantize
from qatlab.quantizers.seq import SEQ, paretoq
from qatlab.quantizers.spec import QuantConfig
from qatlab.quantizers.ste import round_ste

__all__ = ["QuantConfig", "WeightQuantizer", "QuantizerFactory", "QuantizedWeight", "Grid", "MinMax", "NormalFloat",
           "Binary", "minmax", "LSQ", "SEQ", "paretoq", "DynamicQuantizer", "fake_quantize", "quantize",
           "dequantize", "round_ste"]
