"""LSQ: a learned step size per group (and a learned zero point for asymmetric grids).

One quantizer covers the learned-affine recipes, each a config of it (conf/quantizer/):
  lsq           LSQ (Esser et al. 2020; lsq-net's port): symmetric, g = 1/sqrt(N * Qp), init 2 mean|w| / sqrt(Qp)
  paretoq's 3/4-bit: per output row, full range, g with N = the whole matrix, init max|w| / (2^(b-1) - 1)
  efficientqat  EfficientQAT's UniformAffineQuantizer: asymmetric per group, MinMax init (no widening
                to 0), zero point rounded and clamped with an STE, scale clamped to [1e-4, 1e4], no g

Forward, per group (w_g: the group's latent weights, s: its step, z: its zero point in code units, 0
when symmetric):
    s' = clamp(s, scale_min, scale_max)          (gradient passes to s unchanged)
    z' = clamp(round(z), qmin, qmax)             (gradient passes to z unchanged)
    r  = round(w_g / s') + z'
    q  = clamp(r, qmin, qmax)                     the shipped codes
    w_hat = (q - z') * s'
Backward ("inside": the group element was not clipped; clip_test picks how that is decided:
  unrounded: qmin <= w/s' + z' <= qmax (LSQ, ParetoQ: `Qn <= W/alpha <= Qp`);
  rounded:   qmin <= r <= qmax          (EfficientQAT: torch.clamp after round_ste))
    dL/dw   = dL/dw_hat                            inside, else 0
    dL/ds   = g * sum_g dL/dw_hat * (round(w/s') - w/s')   inside, (q - z') where clipped
    dL/dz   = g * sum_g dL/dw_hat * (0 inside, -s' where clipped)
g: the LSQ gradient scale 1/sqrt(N * Qp), Qp = qmax; N = the layer's weights (grad_scale=layer,
lsq-net's and ParetoQ's choice), the group's (grad_scale=group), or g = 1 (grad_scale=none).
Codes frozen (freeze_codes: EfficientQAT's E2E-QP): w_hat = (q - z') * s' with q and z fixed;
dL/ds = g * sum_g dL/dw_hat * (q - z').
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

INITS = ("absmax", "minmax", "lsq", "3sigma", "mse")
GRAD_SCALES = ("layer", "group", "none")
CLIP_TESTS = ("unrounded", "rounded")
MSE_STEPS = 40  # candidate shrink ratios of the absmax step tried by init=mse


class _LSQFunction(torch.autograd.Function):
    """The forward above and its exact reference backward; saves only the (shared) latent weight."""

    @staticmethod
    def forward(ctx, w: Tensor, scale: Tensor, zero: Tensor | None, q: LSQ) -> Tensor:
        s, zq = q.effective_qparams(scale, zero)
        x, raw, codes = q.codes_of(w.detach(), s, zq)
        ctx.save_for_backward(w, scale, zero if zero is not None else torch.empty(0))
        ctx.q, ctx.has_zero = q, zero is not None
        return affine_values(codes, s, zq).reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, scale, zero = ctx.saved_tensors
        q = ctx.q
        s, zq = q.effective_qparams(scale, zero if ctx.has_zero else None)
        x, raw, codes = q.codes_of(w.detach(), s, zq)  # recomputed: cheaper than saving 3 copies of every weight
        test = raw if q.clip_test == "rounded" else x + (zq if zq is not None else 0)
        inside = (test >= q.spec.qmin) & (test <= q.spec.qmax)
        g_out = grad.reshape(codes.shape).float()
        grad_w = (g_out * inside).reshape(w.shape).to(w.dtype)
        step_term = torch.where(inside, torch.round(x) - x, codes - (zq if zq is not None else 0))
        grad_s = (step_term * g_out).sum(-1, keepdim=True) * q.gradient_scale
        grad_z = None
        if ctx.has_zero:
            grad_z = (torch.where(inside, 0.0, -s) * g_out).sum(-1, keepdim=True) * q.gradient_scale
        return grad_w, grad_s, grad_z, None


class LSQ(WeightQuantizer):
    """Parameters: scale (R, 1) and, for asymmetric grids, zero (R, 1), R = rows x groups (float32)."""

    def __init__(
        self,
        spec: QuantConfig,
        weight: Tensor,
        *,
        init: str = "lsq",
        grad_scale: str = "layer",
        clip_test: str = "unrounded",
        scale_min: float | None = 1e-5,
        scale_max: float | None = None,
    ) -> None:
        super().__init__(spec, weight.shape)
        require(spec.grid == "int" and not spec.binary,
                f"quantizer=lsq learns steps of int grids of 2-8 bits; {spec.name} is {spec.describe()} "
                "(use quantizer=minmax for NF or 1-bit grids)")
        require(init in INITS, f"quantizer.init={init!r} is not known; use one of {list(INITS)}")
        require(grad_scale in GRAD_SCALES, f"quantizer.grad_scale={grad_scale!r} is not known; use one of {list(GRAD_SCALES)}")
        require(clip_test in CLIP_TESTS, f"quantizer.clip_test={clip_test!r} is not known; use one of {list(CLIP_TESTS)}")
        require(spec.symmetric or init == "minmax",
                f"quantizer.init={init} sets a symmetric step; an asymmetric grid ({spec.describe()}) learns a zero "
                "point too and starts from init=minmax")
        self.init, self.clip_test = init, clip_test
        self.scale_min, self.scale_max = scale_min, scale_max
        n = self.shape.numel() if grad_scale == "layer" else self.group_size
        self.gradient_scale = 1.0 if grad_scale == "none" else 1.0 / math.sqrt(n * spec.qmax)
        self.grad_scale_mode = grad_scale
        r = self.rows * self.groups
        self.scale = nn.Parameter(torch.ones(r, 1, device=weight.device))
        self.zero = None if spec.symmetric else nn.Parameter(torch.zeros(r, 1, device=weight.device))
        self.frozen: FrozenCodes | None = None
        self.initialize(weight)

    # -- the math ---------------------------------------------------------------------------------
    def effective_qparams(self, scale: Tensor, zero: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(s', z') the forward uses, float32 (R, 1)."""
        s = scale.float().clamp(self.scale_min, self.scale_max)
        zq = None if zero is None else torch.round(zero.float()).clamp(self.spec.qmin, self.spec.qmax)
        return s, zq

    def codes_of(self, w: Tensor, s: Tensor, zq: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(w / s', round(w / s') + z', the clamped codes), each (R, group) float32."""
        x = w.float().reshape(s.shape[0], -1) / s
        raw = torch.round(x) + (zq if zq is not None else 0)
        return x, raw, raw.clamp(self.spec.qmin, self.spec.qmax)

    def forward(self, w: Tensor) -> Tensor:
        if self.frozen is not None:
            s = grad_scale(clamp_ste(self.scale.float(), self.scale_min, self.scale_max), self.gradient_scale)
            _, zq = self.effective_qparams(self.scale, self.zero)
            codes = self.frozen.codes.float().reshape(s.shape[0], -1)
            return affine_values(codes, s, None if zq is None else zq.detach()).reshape(w.shape).to(w.dtype)
        return _LSQFunction.apply(w, self.scale, self.zero, self)

    @torch.no_grad()
    def encode(self, w: Tensor) -> QuantizedWeight:
        s, zq = self.effective_qparams(self.scale, self.zero)
        if self.frozen is not None:
            codes = self.frozen.codes.float().reshape(s.shape[0], -1)
        else:
            codes = self.codes_of(w, s, zq)[2]
        return QuantizedWeight(
            codes=codes.to(torch.int16).reshape(self.shape),
            scale=s.reshape(self.rows, self.groups),
            zero=None if zq is None else zq.reshape(self.rows, self.groups),
            grid=affine_grid(self.spec, label=f"{self.spec.describe()} lsq"),
            group_size=self.group_size,
        )

    # -- init and freezing ------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, w: Tensor) -> None:
        wg = w.detach().float().reshape(self.rows * self.groups, -1)  # (R, group)
        if self.zero is not None:  # EfficientQAT: per-group MinMax, no widening to include 0
            lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
            s = ((hi - lo) / self.spec.qmax).clamp(self.scale_min or 0.0, self.scale_max)
            self.scale.copy_(s)
            self.zero.copy_(torch.round(-(lo / s).clamp(-1e4, 1e4)))
            return
        self.scale.copy_(symmetric_init(wg, self.spec, self.init).clamp_min(self.scale_min or 0.0))

    @torch.no_grad()
    def freeze_codes(self, w: Tensor) -> None:
        s, zq = self.effective_qparams(self.scale, self.zero)
        self.frozen = FrozenCodes(self.codes_of(w, s, zq)[2].to(torch.int16).reshape(self.shape))
        if self.zero is not None:  # E2E-QP trains the scales only
            self.zero.requires_grad_(False)
            self.zero.qatlab_frozen = True

    def describe(self) -> str:
        return f"{self.spec.describe()} lsq(init={self.init}, g={self.grad_scale_mode}{', codes frozen' if self.frozen else ''})"


def symmetric_init(wg: Tensor, spec: QuantConfig, init: str) -> Tensor:
    """(R, 1) initial steps for a grouped view (R, group) of the weight."""
    amax = wg.abs().amax(-1, keepdim=True).clamp_min(1e-8)
    half = 2 ** (spec.bits - 1)
    if init == "absmax":  # ParetoQ's 3/4-bit init: max|w| / (2^(b-1) - 1)
        return amax / (half - 1)
    if init == "minmax":  # the MinMax quantizer's own step: an LSQ student starts as the RTN student
        return amax / (half if spec.full_range else spec.qmax)
    if init == "lsq":  # LSQ: 2 mean|w| / sqrt(Qp)
        return 2 * wg.abs().mean(-1, keepdim=True) / math.sqrt(spec.qmax)
    if init == "3sigma":  # LSQ+'s weight init: max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)
        mu, sigma = wg.mean(-1, keepdim=True), wg.std(-1, keepdim=True, unbiased=False)
        return torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / half
    return mse_init(wg, spec, amax / spec.qmax)


def mse_init(wg: Tensor, spec: QuantConfig, base: Tensor) -> Tensor:
    """The step among base x {1, 0.98, ..., 0.22} with the least squared rounding error per group."""
    best, best_err = base.clone(), torch.full_like(base, float("inf"))
    for i in range(MSE_STEPS):
        s = base * (1 - 0.02 * i)
        err = ((torch.round(wg / s).clamp(spec.qmin, spec.qmax) * s - wg) ** 2).sum(-1, keepdim=True)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best
