"""PackedLinear: the inference stand-in for a FakeQuantLinear, holding packed codes instead of a weight.

forward: activations are fake-quantized exactly as FakeQuantLinear does (act_cfg); then
  - on CUDA with Triton, a few tokens (decode) and a kernel-supported grid (affine 2/4/8-bit, a scale
    per group or channel): the fused dequantize-in-registers GEMV of qatlab.kernels.w2_gemv;
  - everywhere else (CPU, prefill, NF codebooks, 3-bit): the torch fallback, which unpacks the codes and
    dequantizes them with qatlab.quantizers.codes.dequantize (the function every quantizer's forward
    computes through), then F.linear. On CPU in fp32 this gives the fake-quant student's output bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatlab import kernels
from qatlab.export.bitpack import unpack_codes
from qatlab.quantizers.codes import Grid, dequantize
from qatlab.quantizers.primitives import fake_quantize
from qatlab.quantizers.spec import QuantConfig


class PackedLinear(nn.Module):
    """Buffers qweight (out, words) int32, scales (rows, G[, 2]), zeros (rows, G) or None; bias as in nn.Linear."""

    def __init__(self, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: nn.Parameter | None,
                 in_features: int, grid: Grid, group_size: int, act_cfg: QuantConfig | None = None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)  # None registers nothing in the state dict
        self.register_parameter("bias", bias)
        self.out_features, self.in_features = qweight.shape[0], in_features
        self.grid, self.group_size = grid, group_size
        self.act_cfg = act_cfg

    def codes(self) -> Tensor:
        """The integer codes (out, in) as int16: what the quantizer's encode() gave, qmin..qmax."""
        unsigned = unpack_codes(self.qweight, self.grid.bits, self.in_features)
        return unsigned.to(torch.int16) + self.grid.qmin

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(out, in): the same values the quantizer's forward gave the student."""
        zeros = None if self.zeros is None else self.zeros.float()
        return dequantize(self.codes(), self.scales.float(), zeros, self.grid).to(dtype)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        x = fake_quantize(x, self.act_cfg)
        if kernels.use_kernel(x, self.in_features) and kernels.int_grid_supported(self.grid, self.scales.shape[0],
                                                                                 self.out_features):
            from qatlab.kernels.w2_gemv import int_gemv  # needs Triton: imported only when used

            return int_gemv(x, self.qweight, self.scales, self.zeros, self.grid.bits, self.group_size,
                            self.grid.fixed_zero - self.grid.qmin, self.bias)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        a = self.act_cfg.describe() if self.act_cfg else "off"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight={self.grid.label} packed, act={a}")
