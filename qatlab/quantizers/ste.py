"""Gradient tricks as tiny autograd Functions: exact forward values (no `x + (f(x) - x).detach()`, whose
float sum need not equal f(x)), chosen backward.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, g: float) -> Tensor:
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.g, None


def grad_scale(x: Tensor, g: float) -> Tensor:
    """x forward; gradient multiplied by g (LSQ's step-size gradient scale)."""
    return x if g == 1.0 else _GradScale.apply(x, g)


class _ClampSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lo: float | None, hi: float | None) -> Tensor:
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None


def clamp_ste(x: Tensor, lo: float | None, hi: float | None) -> Tensor:
    """clamp forward, identity gradient (EfficientQAT's clamp_ste; ParetoQ's alpha floor)."""
    return x if lo is None and hi is None else _ClampSTE.apply(x, lo, hi)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def round_ste(x: Tensor) -> Tensor:
    """torch.round forward (halves to even), identity gradient."""
    return _RoundSTE.apply(x)
