"""SEQ: ParetoQ's stretched elastic quantization for 2-bit and ternary weights (Liu et al. 2025).

A learned alpha per group (ParetoQ: per output row; `granularity: group` for per-group alphas),
symmetric, no zero level at 2 bits. With u = clamp(w / alpha, -0.99, 0.99):
  ternary (bits 2, range restricted)  w_hat = alpha * round(1.5 u) / 1.5          levels alpha x {-2/3, 0, 2/3}
  2-bit   (bits 2, range full)        w_hat = alpha * (round(2 u - 0.5) + 0.5) / 2  levels alpha x {+-1/4, +-3/4}
Shipped on the affine grid w_hat = (code - zero) * step, step = alpha / n (n = 1.5 or 2), codes the
spec's symmetric range: ternary codes -1..1 with zero 0; 2-bit codes -2..1 with the fixed zero -0.5.
Backward (the reference's StretchedElasticQuant, x = w / alpha):
  dL/dw     = dL/dw_hat where |x| <= 0.99, else 0
  dL/dalpha = g * sum_g dL/dw_hat * (w_hat / alpha - x inside, +-Qp' outside by the sign of x)
              Qp' = 0.75 at 2 bits, 1.0 at ternary; g = 1/sqrt(N) (ParetoQ: N = the whole matrix)
Init alpha = max|w| of the group. The forward floors alpha at 1e-5, the gradient goes to the raw alpha.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qatlab.errors import require
from qatlab.quantizers.base import FrozenCodes, WeightQuantizer, affine_grid, affine_values
from qatlab.quantizers.codes import QuantizedWeight
from qatlab.quantizers.spec import QuantConfig
from qatlab.quantizers.ste import clamp_ste, grad_scale

CLIP = 1 - 1e-2  # |w / alpha| beyond this is clipped (the reference's clip_val)
ALPHA_MIN = 1e-5
GRAD_SCALES = ("layer", "group", "none")


class _SEQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, alpha: Tensor, q: SEQ) -> Tensor:
        codes, step = q.codes_and_step(w.detach(), alpha)
        ctx.save_for_backward(w, alpha)
        ctx.q = q
        return affine_values(codes, step, None, q.zero_point).reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, alpha = ctx.saved_tensors
        q = ctx.q
        a = alpha.float().clamp_min(ALPHA_MIN)
        x = w.detach().float().reshape(a.shape[0], -1) / a
        codes, _ = q.codes_and_step(w.detach(), alpha)
        level = (codes - q.zero_point) / q.n_levels  # w_hat / alpha
        inside = x.abs() <= CLIP
        g_out = grad.reshape(x.shape).float()
        grad_w = (g_out * inside).reshape(w.shape).to(w.dtype)
        alpha_term = torch.where(inside, level - x, torch.sign(x) * q.qp)
        grad_alpha = (alpha_term * g_out).sum(-1, keepdim=True) * q.gradient_scale
        return grad_w, grad_alpha, None


class SEQ(WeightQuantizer):
    """Parameter alpha (R, 1), R = rows x groups (float32)."""

    def __init__(self, spec: QuantConfig, weight: Tensor, *, grad_scale: str = "layer") -> None:
        super().__init__(spec, weight.shape)
        require(spec.bits == 2 and spec.symmetric and spec.grid == "int",
                f"quantizer=seq is ParetoQ's 2-bit / ternary grid: set {spec.name}.bits=2, symmetric=true "
                f"(range=restricted: ternary, range=full: 4 levels); got {spec.describe()}. "
                "ParetoQ uses LSQ at 3-4 bits (quantizer=paretoq picks it)")
        require(grad_scale in GRAD_SCALES, f"quantizer.grad_scale={grad_scale!r} is not known; use one of {list(GRAD_SCALES)}")
        self.ternary = spec.ternary
        self.n_levels, self.shift = (1.5, 0.0) if self.ternary else (2.0, 0.5)
        self.qp = (self.n_levels - self.shift) / self.n_levels  # the clipped-region gradient: 1.0 | 0.75
        self.zero_point = -self.shift  # 0 | -0.5: w_hat = (code - zero_point) * alpha / n, codes -1..1 | -2..1
        n = self.shape.numel() if grad_scale == "layer" else self.group_size
        self.gradient_scale = 1.0 if grad_scale == "none" else 1.0 / math.sqrt(n)  # ParetoQ: Qp = 1 at 2 bits
        self.grad_scale_mode = grad_scale
        self.alpha = nn.Parameter(torch.ones(self.rows * self.groups, 1, device=weight.device))
        self.frozen: FrozenCodes | None = None
        self.initialize(weight)

    def codes_and_step(self, w: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """(R, group) float codes on the shipped grid and the (R, 1) step alpha / n."""
        a = alpha.float().clamp_min(ALPHA_MIN)
        u = (w.float().reshape(a.shape[0], -1) / a).clamp(-CLIP, CLIP)
        return torch.round(u * self.n_levels - self.shift), a / self.n_levels

    def forward(self, w: Tensor) -> Tensor:
        if self.frozen is not None:
            a = grad_scale(clamp_ste(self.alpha.float(), ALPHA_MIN, None), self.gradient_scale)
            codes = self.frozen.codes.float().reshape(a.shape[0], -1)
            return affine_values(codes, a / self.n_levels, None, self.zero_point).reshape(w.shape).to(w.dtype)
        return _SEQFunction.apply(w, self.alpha, self)

    @torch.no_grad()
    def encode(self, w: Tensor) -> QuantizedWeight:
        codes, step = self.codes_and_step(w, self.alpha)
        if self.frozen is not None:
            codes = self.frozen.codes.float().reshape(step.shape[0], -1)
        label = "ternary seq" if self.ternary else "2-bit seq"
        return QuantizedWeight(
            codes=codes.to(torch.int16).reshape(self.shape),
            scale=step.reshape(self.rows, self.groups),
            zero=None,
            grid=affine_grid(self.spec, label=f"{self.spec.describe()} ({label})", fixed_zero=self.zero_point),
            group_size=self.group_size,
        )

    @property
    def has_zero_points(self) -> bool:
        return False  # the zero is a constant of the grid, not stored per group

    @torch.no_grad()
    def initialize(self, w: Tensor) -> None:
        self.alpha.copy_(w.detach().float().reshape(self.alpha.shape[0], -1).abs().amax(-1, keepdim=True))

    @torch.no_grad()
    def freeze_codes(self, w: Tensor) -> None:
        self.frozen = FrozenCodes(self.codes_and_step(w, self.alpha)[0].to(torch.int16).reshape(self.shape))

    def describe(self) -> str:
        return f"{'ternary' if self.ternary else '2-bit'} seq g={self.grad_scale_mode}"


def paretoq(spec: QuantConfig, weight: Tensor, *, grad_scale: str = "layer") -> WeightQuantizer:
    """ParetoQ's choice by bit width: SEQ at 2 bits and ternary, LSQ (absmax init, N = the matrix) at 3-4."""
    from qatlab.quantizers.lsq import LSQ

    if spec.bits == 2:
        return SEQ(spec, weight, grad_scale=grad_scale)
    require(spec.bits in (3, 4) and spec.symmetric,
            f"quantizer=paretoq covers ternary, 2, 3 and 4 bits, symmetric; got {spec.describe()} "
            "(ParetoQ's 1-bit is not built in: the onebit recipe is qatlab's 1-bit path)")
    return LSQ(spec, weight, init="absmax", grad_scale=grad_scale, clip_test="unrounded", scale_min=ALPHA_MIN)
