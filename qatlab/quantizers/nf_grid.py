"""Normal-float (NF) codebooks: 2^bits values on [-1, 1] placed at quantiles of a standard normal.

Construction (QLoRA's NF4 recipe, generalized to `bits`; n = 2^bits values):
  - an asymmetric split that keeps an exact zero: n/2 positive values, n/2 - 1 negative ones, and 0;
  - positives = Phi^-1(p) for the n/2 + 1 probabilities evenly spaced from `offset` down to 0.5,
    dropping the last (p = 0.5 is the zero); negatives = -Phi^-1(p) for n/2 probabilities from
    `offset` to 0.5, again dropping 0.5;
  - offset = 1 - (1/(2n) + 1/(2(n - 1))) / 2, the mean of the two tail quantile levels QLoRA
    averages (NF4: 0.9677), so the outermost values are finite;
  - each side is divided by its largest magnitude, so the codebook spans exactly [-1, 1].
For bits=3 this reproduces BitDistiller's NF3 table to float32 precision:
  [-1, -0.5350, -0.2469, 0, 0.1833, 0.3820, 0.6230, 1].
Rounding is to the nearest codebook value; an exact midpoint goes to the larger value, as in
BitDistiller's reference thresholds.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

NF_BITS = (2, 3, 4)


def _offset(n: int) -> float:
    return 1 - 0.5 * (1 / (2 * n) + 1 / (2 * (n - 1)))


def _half(count: int, offset: float) -> Tensor:
    """count normal quantiles for probabilities offset..0.5 (0.5 excluded), scaled to max 1."""
    probs = torch.linspace(offset, 0.5, count + 1, dtype=torch.float64)[:-1]
    values = torch.special.ndtri(probs)
    return values / values.max()


@lru_cache(maxsize=None)
def _codebook64(bits: int) -> Tensor:
    n = 2**bits
    offset = _offset(n)
    positives = _half(n // 2, offset)
    negatives = -_half(n // 2 - 1, offset)
    return torch.cat([negatives, torch.zeros(1, dtype=torch.float64), positives]).sort().values


def nf_codebook(bits: int, device: torch.device | str | None = None) -> Tensor:
    """The 2^bits NF values, ascending, float32: (2^bits,)."""
    if bits not in NF_BITS:
        raise ValueError(f"NF codebooks exist for bits {NF_BITS}, not {bits}")
    return _codebook64(bits).to(device=device, dtype=torch.float32)


def nf_midpoints(bits: int, device: torch.device | str | None = None) -> Tensor:
    """Decision thresholds between neighbouring codebook values: (2^bits - 1,)."""
    book = _codebook64(bits)
    return ((book[1:] + book[:-1]) / 2).to(device=device, dtype=torch.float32)


def nf_round(xn: Tensor, bits: int) -> Tensor:
    """Codebook indices (int64) of the nearest NF value to xn (already normalized to ~[-1, 1])."""
    # right=True: a value equal to a threshold lands in the upper bucket (ties go up).
    return torch.bucketize(xn, nf_midpoints(bits, xn.device), right=True)
