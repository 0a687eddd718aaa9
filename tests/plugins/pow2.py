"""A quantizer written outside qatlab, as a user would: power-of-two scales (shift-only dequantization).

Per group: s = 2^ceil(log2(max|w| / qmax)) (the smallest power of two that keeps every weight in range),
codes = clamp(round(w / s), -qmax, qmax), w_hat = codes * s; the gradient passes straight through
inside the range. No edits to qatlab: select it with `quantizer._target_=tests.plugins.pow2.PowerOfTwo`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qatlab.quantizers.base import WeightQuantizer, affine_grid
from qatlab.quantizers.codes import QuantizedWeight, grouped
from qatlab.quantizers.ste import round_ste


class PowerOfTwo(WeightQuantizer):
    """Symmetric int grid of spec.bits with power-of-two scales; no parameters."""

    def __init__(self, spec, weight: Tensor) -> None:  # the factory signature: quantizer(spec, weight)
        super().__init__(spec, weight.shape)

    def scale(self, w: Tensor) -> Tensor:
        """(rows, G) power-of-two scales of w (out, in)."""
        g = grouped(w.detach().float(), torch.empty(self.rows, self.groups))
        step = (g.abs().amax(-1) / self.spec.qmax).clamp_min(2.0**-24)
        return torch.exp2(torch.ceil(torch.log2(step)))

    def forward(self, w: Tensor) -> Tensor:
        s = self.scale(w)
        x = grouped(w.float(), s) / s[..., None]
        codes = torch.clamp(round_ste(x), self.spec.qmin, self.spec.qmax)
        return (codes * s[..., None]).reshape(w.shape).to(w.dtype)

    @torch.no_grad()
    def encode(self, w: Tensor) -> QuantizedWeight:
        s = self.scale(w)
        codes = torch.clamp(torch.round(grouped(w.float(), s) / s[..., None]), self.spec.qmin, self.spec.qmax)
        grid = affine_grid(self.spec, label=f"int{self.spec.bits} pow2")
        return QuantizedWeight(codes.to(torch.int16).reshape(w.shape), s, None, grid, self.group_size)
