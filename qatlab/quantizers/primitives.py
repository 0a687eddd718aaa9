"""Fake-quantization math: pure functions plus two small autograd Functions.

Grids (grid="int"; codes are integers, `s` is the per-group scale):
  symmetric, bits >= 2, range=restricted: codes -qmax..qmax, qmax = 2^(bits-1) - 1 (no -2^(bits-1)),
      s = max|x| / qmax (MinMax as in LLM-QAT), x_hat = code * s. At 2 bits this is ternary.
  symmetric, bits >= 2, range=full: codes -2^(bits-1)..2^(bits-1)-1, s = max|x| / 2^(bits-1)
      (= 2 max|x| / 2^bits, DeepSpeed's SymQuantizer that ZeroQuant's reference uses: the most
      positive value clips to (2^(bits-1)-1) s, the most negative lands on -2^(bits-1) s).
  symmetric, bits == 1: binary {-s, +s}, s = mean|x| (BWN / XNOR-Net); codes 0/1 mean -s/+s,
      and x == 0 maps to +s.
  asymmetric: codes 0..2^bits-1, s = (max - min) / (2^bits - 1), zero = round(-min / s),
      x_hat = (clamp(round(x / s) + zero, 0, 2^bits - 1) - zero) * s.
      min/max are widened to include 0 so the zero point always lies on the grid; otherwise an
      all-positive group would get zero < 0, be clamped to 0, and lose most of its range.
Normal-float grid (grid="nf", bits 2-4; codebook c of 2^bits values on [-1, 1], qatlab.quantizers.nf_grid):
  codes are codebook indices 0..2^bits-1; scale is (rows, 2) = (s_neg, s_pos): x < 0 is divided by
  s_neg, x >= 0 by s_pos, then rounded to the nearest codebook value; x_hat = c[code] * (s_neg if
  c[code] < 0 else s_pos); zero is None.
      asymmetric: s_neg = -min, s_pos = max (min/max widened to include 0), so the group's min maps
          to -1 and its max to +1 (BitDistiller's NF3 quantizer does exactly this);
      symmetric: s_neg = s_pos = max|x| (QLoRA's absmax).
  A given scale of shape (rows, 1) serves both halves.

Rounding is torch.round: halves go to the even integer (0.5 -> 0, 1.5 -> 2).
All qparams and codes are computed in float32; fake_quantize returns x's dtype.
Scales are reduced along the last dim of `group_view(x, cfg)`, shape (rows, 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qatlab.errors import require
from qatlab.quantizers.spec import QuantConfig
from qatlab.quantizers.nf_grid import nf_codebook, nf_round

# Floor for max|x| and for the asymmetric step. Far above fp32's smallest normal, so x / scale
# never overflows to inf or makes NaN; a group this small is all ~zero and dequantizes to 0.
EPS = 1e-8


def group_view(x: Tensor, cfg: QuantConfig) -> Tensor:
    """Reshape x so each row shares one scale: (rows, elements). Undo with `.reshape(x.shape)`.

    tensor: (1, numel); channel/token: (numel / last, last); group: (numel / g, g).
    A weight (out, in) and activations (..., in) are both handled along their last dim.
    """
    if cfg.granularity == "tensor":
        return x.reshape(1, -1)
    if cfg.granularity == "chunks":  # DeepSpeed's input.reshape(num_groups, -1)
        cfg.check_numel(x.numel())
        return x.reshape(cfg.num_groups, -1)
    if cfg.granularity in ("channel", "token"):
        return x.reshape(-1, x.shape[-1])
    cfg.check_width(x.shape[-1], layer="")
    return x.reshape(-1, cfg.group_size)


@torch.no_grad()
def compute_qparams(xg: Tensor, cfg: QuantConfig) -> tuple[Tensor, Tensor | None]:
    """MinMax scale and zero point per row of a grouped view: ((rows, 1), (rows, 1) or None).

    zero is None for symmetric grids; for asymmetric it is integer-valued float32.
    """
    xg = xg.float()
    if cfg.nf:
        return _nf_scales(xg, cfg), None
    if cfg.binary:
        return xg.abs().mean(dim=-1, keepdim=True).clamp_min(EPS), None
    if cfg.symmetric:
        amax = xg.abs().amax(dim=-1, keepdim=True).clamp_min(EPS)
        return amax / (-cfg.qmin if cfg.full_range else cfg.qmax), None
    lo, hi = minmax_range(xg, cfg)
    scale = ((hi - lo) / cfg.qmax).clamp_min(EPS)
    zero = torch.round(-lo / scale).clamp(0, cfg.qmax)
    return scale, zero


def minmax_range(xg: Tensor, cfg: QuantConfig) -> tuple[Tensor, Tensor]:
    """(lo, hi) per row of a grouped view: the group's min and max, widened to include 0 when cfg.widen."""
    lo, hi = xg.amin(dim=-1, keepdim=True), xg.amax(dim=-1, keepdim=True)
    return (lo.clamp_max(0.0), hi.clamp_min(0.0)) if cfg.widen else (lo, hi)


def round_codes(x: Tensor, cfg: QuantConfig) -> Tensor:
    """x to the nearest integer by cfg.rounding: halves to even (torch.round) or away from zero."""
    return torch.round(x) if cfg.rounding == "half_even" else torch.sign(x) * torch.floor(x.abs() + 0.5)


def _nf_scales(xg: Tensor, cfg: QuantConfig) -> Tensor:
    """(rows, 2): the scales of the negative and the positive half of each row."""
    if cfg.symmetric:
        amax = xg.abs().amax(dim=-1, keepdim=True).clamp_min(EPS)
        return torch.cat([amax, amax], dim=-1)
    neg = (-xg.amin(dim=-1, keepdim=True)).clamp_min(EPS)
    pos = xg.amax(dim=-1, keepdim=True).clamp_min(EPS)
    return torch.cat([neg, pos], dim=-1)


def _nf_codes_and_mask(xg: Tensor, cfg: QuantConfig, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Codebook indices (rows, g) as float, and a mask of entries inside the codebook's [-1, 1]."""
    xn = xg / torch.where(xg < 0, scale[..., :1], scale[..., -1:])
    return nf_round(xn, cfg.bits).float(), xn.abs() <= 1


def _codes_and_mask(
    xg: Tensor, cfg: QuantConfig, scale: Tensor, zero: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Float codes (rows, g) and a bool mask of entries the clamp did not change."""
    if cfg.nf:
        return _nf_codes_and_mask(xg, cfg, scale)
    if cfg.binary:
        codes = (xg >= 0).float()
        return codes, torch.ones_like(xg, dtype=torch.bool)  # sign() clips nothing
    raw = round_codes(xg / scale, cfg)
    if zero is not None:
        raw = raw + zero
    codes = raw.clamp(cfg.qmin, cfg.qmax)
    return codes, codes == raw


def _code_dtype(cfg: QuantConfig) -> torch.dtype:
    # bits <= 8: symmetric codes fit int8 (|code| <= 127), the others fit uint8.
    return torch.int8 if cfg.qmin < 0 else torch.uint8


def _params(
    xg: Tensor, cfg: QuantConfig, scale: Tensor | None, zero: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Given qparams (as float32) or MinMax ones computed from xg."""
    if scale is None:
        require(zero is None, "a zero point was given without a scale; pass both or neither")
        return compute_qparams(xg, cfg)
    require(
        cfg.symmetric or cfg.nf or zero is not None,
        f"{cfg.name}: an asymmetric quantizer needs a zero point when a scale is given",
    )
    scale = torch.as_tensor(scale, dtype=torch.float32, device=xg.device)
    if cfg.nf and scale.dim() == 0:
        scale = scale.reshape(1)  # NF picks the halves with scale[..., :1] / scale[..., -1:]
    if zero is not None and not cfg.symmetric and not cfg.nf:
        zero = torch.as_tensor(zero, dtype=torch.float32, device=xg.device)
    else:
        zero = None
    return scale, zero


def _quantize(x: Tensor, cfg: QuantConfig, scale: Tensor | None, zero: Tensor | None):
    """Shared by quantize and FakeQuantSTE: (float codes, clamp mask, scale, zero)."""
    xg = group_view(x.detach(), cfg).float()  # (rows, g)
    scale, zero = _params(xg, cfg, scale, zero)
    codes, mask = _codes_and_mask(xg, cfg, scale, zero)
    return codes, mask, scale, zero


def quantize(
    x: Tensor, cfg: QuantConfig, scale: Tensor | None = None, zero: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Integer codes in the grouped view shape (int8 if symmetric >= 2 bits, else uint8), scale, zero.

    scale/zero default to MinMax over each group; pass them (broadcastable to (rows, 1))
    to quantize with given, e.g. clipped, parameters.
    """
    codes, _, scale, zero = _quantize(x, cfg, scale, zero)
    return codes.to(_code_dtype(cfg)), scale, zero


def dequantize(
    codes: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    cfg: QuantConfig,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of quantize: codes (rows, g) back to real values of `shape` in `dtype`."""
    if cfg.nf:
        v = nf_codebook(cfg.bits, codes.device)[codes.long()]
        x = v.mul_(torch.where(v < 0, scale[..., :1], scale[..., -1:]))
    elif cfg.binary:
        x = (2 * codes.float() - 1) * scale  # 0 -> -s, 1 -> +s
    elif zero is None:
        x = codes.float() * scale
    else:
        x = (codes.float() - zero) * scale
    return x.reshape(shape).to(dtype)


class FakeQuantSTE(torch.autograd.Function):
    """x -> dequantize(quantize(x)) with a straight-through gradient.

    cfg.ste="clipped": backward passes the gradient unchanged where the clamp left x alone (x rounds
    to a code inside [qmin, qmax]) and zeroes it where x was clipped. With restricted-range MinMax
    scales nothing is clipped; with full-range or given (clipped) scales it matters.
    cfg.ste="identity": the gradient passes everywhere (DeepSpeed's quantizers, ZeroQuant).
    cfg.grad_clip=c: additionally zero it where |x| >= c (LLM-QAT's reference zeroes |x| >= 2).
    No gradient reaches scale/zero: learned quantizers (qatlab.quantizers.lsq) have their own Functions.
    """

    @staticmethod
    def forward(ctx, x: Tensor, cfg: QuantConfig, scale: Tensor | None, zero: Tensor | None):
        codes, mask, scale, zero = _quantize(x, cfg, scale, zero)
        mask = mask.reshape(x.shape) if cfg.ste == "clipped" else torch.ones_like(x, dtype=torch.bool)
        if cfg.grad_clip is not None:
            mask = mask & (x.detach().abs() < cfg.grad_clip)
        ctx.save_for_backward(mask)
        # Through the same int dtype as quantize(), so the result is bit-identical to it.
        return dequantize(codes.to(_code_dtype(cfg)), scale, zero, cfg, x.shape, x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return grad.masked_fill(~mask, 0), None, None, None


def fake_quantize(
    x: Tensor, cfg: QuantConfig | None, scale: Tensor | None = None, zero: Tensor | None = None
) -> Tensor:
    """Quantize-dequantize x (same shape and dtype) with an STE gradient; cfg None returns x."""
    if cfg is None:
        return x
    return FakeQuantSTE.apply(x, cfg, scale, zero)


class _RoundCodes(torch.autograd.Function):
    """round_codes forward (exact values), identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, cfg: QuantConfig) -> Tensor:
        return round_codes(x, cfg)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _NFRound(torch.autograd.Function):
    """The nearest NF codebook value forward, identity backward (BitDistiller's round_pass)."""

    @staticmethod
    def forward(ctx, xn: Tensor, bits: int) -> Tensor:
        return nf_codebook(bits, xn.device)[nf_round(xn, bits)]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def fake_quantize_scale_grad(x: Tensor, cfg: QuantConfig) -> Tensor:
    """MinMax fake quantization whose gradient also flows through the scale: min/max (or max|x|) are not
    detached, as in BitDistiller's SteInt2AsymQuantizer / SteN2F3Quantizer (the rounding is straight-through,
    torch.clamp masks what it clips). The same values as fake_quantize, bit for bit.
    x: any shape; the grouped view (rows, g) as group_view."""
    xg = group_view(x, cfg).float()
    if cfg.nf:
        if cfg.symmetric:
            s_neg = s_pos = xg.abs().amax(-1, keepdim=True).clamp_min(EPS)
        else:
            s_neg = (-xg.amin(-1, keepdim=True)).clamp_min(EPS)
            s_pos = xg.amax(-1, keepdim=True).clamp_min(EPS)
        halves = torch.where(xg < 0, s_neg, s_pos)
        v = _NFRound.apply(xg / halves, cfg.bits)
        return (v * torch.where(v.detach() < 0, s_neg, s_pos)).reshape(x.shape).to(x.dtype)
    require(not cfg.binary, f"{cfg.name}: the scale-gradient quantizer covers int and NF grids, not binary")
    if cfg.symmetric:
        amax = xg.abs().amax(-1, keepdim=True).clamp_min(EPS)
        scale, zero = amax / (-cfg.qmin if cfg.full_range else cfg.qmax), None
    else:
        lo, hi = minmax_range(xg, cfg)
        scale = ((hi - lo) / cfg.qmax).clamp_min(EPS)
        zero = torch.round(-lo / scale).clamp(0, cfg.qmax).detach()  # round: no gradient, as in the reference
    raw = _RoundCodes.apply(xg / scale, cfg)
    if zero is not None:
        raw = raw + zero
    codes = raw.clamp(cfg.qmin, cfg.qmax)
    values = codes * scale if zero is None else (codes - zero) * scale
    return values.reshape(x.shape).to(x.dtype)
