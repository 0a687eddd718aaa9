"""PackedLinear: the inference stand-in for a FakeQuantLinear, holding packed codes instead of a weight.

forward: activations are fake-quantized exactly as FakeQuantLinear does (act_cfg); then
  - on CUDA with Triton, a few tokens (decode) and a kernel-supported grid: the fused
    dequantize-in-registers GEMV of qatlab.kernels.w2_gemv;
  - everywhere else (CPU, prefill, NF grids, 3-bit): the torch fallback, which unpacks the codes
    and dequantizes with qatlab.quant.primitives.dequantize, then F.linear. On CPU in fp32 this
    gives the fake-quant student's output bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatlab import kernels
from qatlab.export.bitpack import unpack_codes
from qatlab.quant.config import QuantConfig
from qatlab.quant.primitives import dequantize, fake_quantize, group_view


class PackedLinear(nn.Module):
    """Buffers qweight (out, words) int32, scales, zeros (asymmetric int only); bias as in nn.Linear."""

    def __init__(
        self,
        qweight: Tensor,
        scales: Tensor,
        zeros: Tensor | None,
        bias: nn.Parameter | None,
        in_features: int,
        weight_cfg: QuantConfig,
        act_cfg: QuantConfig | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)  # None registers nothing in the state dict
        self.register_parameter("bias", bias)
        self.out_features, self.in_features = qweight.shape[0], in_features
        self.weight_cfg = weight_cfg
        self.act_cfg = act_cfg

    def codes(self) -> Tensor:
        """The integer codes (out, in) as int16: the values primitives.quantize gave, qmin..qmax."""
        unsigned = unpack_codes(self.qweight, self.weight_cfg.bits, self.in_features)
        return unsigned.to(torch.int16) + self.weight_cfg.qmin

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(out, in): the same values fake_quantize(latent weight) gave the student."""
        cfg = self.weight_cfg
        scale = self.scales.float().reshape(-1, 2 if cfg.nf else 1)  # the grouped view's (rows, 1 | 2)
        zero = None if self.zeros is None else self.zeros.float().reshape(-1, 1)
        shape = (self.out_features, self.in_features)
        return dequantize(group_view(self.codes(), cfg), scale, zero, cfg, shape, dtype)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        x = fake_quantize(x, self.act_cfg)
        if kernels.use_kernel(x, self.in_features) and kernels.int_grid_supported(self.weight_cfg):
            from qatlab.kernels.w2_gemv import int_gemv  # needs Triton: imported only when used

            return int_gemv(x, self.qweight, self.scales, self.zeros, self.weight_cfg, self.bias)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        a = self.act_cfg.describe() if self.act_cfg else "off"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight={self.weight_cfg.describe()} packed, act={a}")
