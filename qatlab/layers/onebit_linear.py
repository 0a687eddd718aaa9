"""OneBitLinear (Xu et al. 2024): Y = LayerNorm([(X * g) sign(W)^T] * h) + bias.

W (out, in) is the latent weight: the original nn.Linear's own Parameter, shared like
FakeQuantLinear shares it, so the optimizer, checkpoints ("<name>.weight") and tied weights keep
working. Only sign(W) enters the forward pass; the value vectors carry the magnitudes:
  g (in,)   input side, scales each input feature
  h (out,)  output side, scales each output feature before the norm
The LayerNorm has no learnable affine by default (the reference); `norm_affine=True` gives it
weight and bias (a reading of the paper's equation). The original bias, if any, is added after
the norm, as the reference does.

There is no `to_linear`: the norm makes the layer something no nn.Linear computes, so `unswap`
leaves it in place.

The sign's gradient is a surrogate chosen by name (autograd Functions below):
  tanh  grad * (1.001 - tanh(k W)^2)   the reference's backward (k = 1 there; `sharpness` k can be
                                        raised during training by SurrogateSchedule); the 0.001
                                        floor keeps a little gradient for saturated weights
  ste   grad where |W| <= 1, else 0    the straight-through estimator with BinaryConnect's clip
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qatlab.errors import require

SURROGATES = ("tanh", "ste")
TANH_FLOOR = 1.001
STE_CLIP = 1.0


def binarize(w: Tensor) -> Tensor:
    """sign(w) in w's dtype with sign(0) = +1: every weight is exactly one bit (torch.sign gives 0)."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


class SignTanhGrad(torch.autograd.Function):
    """binarize(w) forward; grad * (1.001 - tanh(k w)^2) backward."""

    @staticmethod
    def forward(ctx, w: Tensor, sharpness: float) -> Tensor:
        ctx.save_for_backward(w)  # the latent Parameter itself: no extra memory
        ctx.sharpness = sharpness
        return binarize(w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (w,) = ctx.saved_tensors
        t = torch.tanh(ctx.sharpness * w.float())
        return grad * (TANH_FLOOR - t * t).to(grad.dtype), None


class SignSTE(torch.autograd.Function):
    """binarize(w) forward; identity backward where |w| <= 1, zero outside (clipped STE)."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        return binarize(w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (w,) = ctx.saved_tensors
        return grad.masked_fill(w.abs() > STE_CLIP, 0)


def sign_surrogate(w: Tensor, surrogate: str = "tanh", sharpness: float = 1.0) -> Tensor:
    """±1 signs of w with the named gradient surrogate."""
    if surrogate == "tanh":
        return SignTanhGrad.apply(w, sharpness)
    require(surrogate == "ste", f"surrogate={surrogate!r} is not known; use one of {list(SURROGATES)}")
    return SignSTE.apply(w)


class OneBitLinear(nn.Module):
    """Holds the state (latent W, g, h, norm, bias); the math is sign_surrogate + F.linear + layer_norm."""

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        surrogate: str = "tanh",
        norm_affine: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        require(
            surrogate in SURROGATES,
            f"quantizer.surrogate='{surrogate}' is not known; use one of {list(SURROGATES)}",
        )
        super().__init__()
        self.register_parameter("weight", weight)  # (out, in) latent weight, shared with the original
        self.register_parameter("bias", bias)  # (out,) or None
        self.out_features, self.in_features = weight.shape
        like = {"device": weight.device, "dtype": weight.dtype}
        self.g = nn.Parameter(torch.ones(self.in_features, **like))  # (in,)  SVID sets it
        self.h = nn.Parameter(torch.ones(self.out_features, **like))  # (out,) SVID sets it
        self.norm = nn.LayerNorm(self.out_features, eps=norm_eps, elementwise_affine=norm_affine, **like)
        self.surrogate = surrogate
        self.sharpness = 1.0  # k in the tanh surrogate; a plain float so schedules can set it

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "", **options) -> OneBitLinear:
        """Wrap `linear`'s own weight and bias Parameters."""
        require(
            isinstance(linear, nn.Linear),
            f"layer '{name}' is {type(linear).__name__}, not nn.Linear; only Linear layers can be binarized",
        )
        return cls(linear.weight, linear.bias, **options)

    def storage_bits(self, float_bits: int = 16) -> int:
        """Bits this layer ships without its bias: packed signs (rows padded to whole int32 words), g, h, norm."""
        from qatlab.export.bitpack import packed_width

        vectors = self.in_features + self.out_features + (2 * self.out_features if self.norm.elementwise_affine else 0)
        return self.out_features * 32 * packed_width(self.in_features, 1) + float_bits * vectors

    def quantizer_parameters(self) -> list[nn.Parameter]:
        """What plays the role of qparams here: the value vectors g, h (and the norm's affine)."""
        return [self.g, self.h, *self.norm.parameters()]

    @torch.no_grad()
    def signs(self) -> Tensor:
        """The ±1 matrix (out, in) this layer computes with."""
        return binarize(self.weight)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        s = sign_surrogate(self.weight, self.surrogate, self.sharpness)  # (out, in), ±1
        y = F.linear(x * self.g, s) * self.h  # (..., out)
        y = self.norm(y)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"surrogate={self.surrogate}, norm_affine={self.norm.elementwise_affine}"
        )
