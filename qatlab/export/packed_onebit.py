"""PackedOneBitLinear: the inference stand-in for a OneBitLinear, holding its signs packed 32 per int32.

forward: Y = LayerNorm([(X * g) S^T] * h) + bias, as OneBitLinear computes it, with S unpacked from
the words. The bracket runs in qatlab.kernels.w1_gemv on CUDA with Triton for a few tokens (decoding),
else in torch (the same ops as OneBitLinear, so CPU fp32 gives the student's output bit for bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatlab import kernels
from qatlab.export.bitpack import unpack_codes


class PackedOneBitLinear(nn.Module):
    """Buffer qweight (out, ceil(in / 32)) int32; g (in,), h (out,), norm, bias as in OneBitLinear (frozen).

    The norm's affine parameters (if any) come from load_state_dict.
    """

    def __init__(self, qweight: Tensor, g: Tensor, h: Tensor, bias: nn.Parameter | None,
                 norm_affine: bool, norm_eps: float) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.out_features, self.in_features = qweight.shape[0], g.numel()
        self.g = nn.Parameter(g, requires_grad=False)  # (in,)
        self.h = nn.Parameter(h, requires_grad=False)  # (out,)
        like = {"device": g.device, "dtype": g.dtype}
        self.norm = nn.LayerNorm(self.out_features, eps=norm_eps, elementwise_affine=norm_affine, **like)
        self.register_parameter("bias", bias)

    def signs(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ±1 matrix (out, in)."""
        bits = unpack_codes(self.qweight, 1, self.in_features)
        return torch.where(bits.bool(), 1.0, -1.0).to(dtype)

    def project(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out): [(X * g) S^T] * h
        if kernels.use_kernel(x, self.in_features):
            from qatlab.kernels.w1_gemv import sign_gemv  # needs Triton: imported only when used

            return sign_gemv(x, self.qweight, self.g, self.h)
        return F.linear(x * self.g, self.signs(x.dtype)) * self.h

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        y = self.norm(self.project(x))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"signs packed 32 per int32, norm_affine={self.norm.elementwise_affine}")
