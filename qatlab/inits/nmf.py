"""Rank-1 factorizations of |W| for OneBit's SVID init: sign(W) and two value vectors.

SVID (sign-value-independent decomposition): W ~ sign(W) * (a b^T) with |W| ~ a b^T, a (out,) >= 0
on the output side (OneBit's h) and b (in,) >= 0 on the input side (its g). The reference code
takes a = NMF's W factor (rows of the weight) and b = its H factor (columns), 1 component.

Why the NMF here is plain alternating least squares: for rank 1 and a non-negative matrix A, the
exact least-squares updates a = A b / |b|^2 and b = A^T a / |a|^2 stay non-negative by themselves
(A, a, b >= 0), so no projection or multiplicative step is needed. It is the power method on
A A^T; started from the column means (positive, so it overlaps with the Perron vector) it
converges geometrically at rate (s2 / s1)^2, and |W| of a trained layer has a dominant s1.
It follows that rank-1 NMF and the rank-1 SVD of |W| (with the signs of the singular vectors
dropped) reach the same product a b^T (Perron-Frobenius); the two inits differ in how the scale
is split between a and b and in convergence. Since OneBitLinear normalizes its output, the split
only changes training dynamics (how large an optimizer step is relative to g and h).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qatlab.errors import require
from qatlab.layers.onebit_linear import binarize

INITS = ("svid", "svd")
_TINY = 1e-30


def rank1_nmf(matrix: Tensor, iters: int = 50, tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """a (m,), b (n,) >= 0 with a b^T ~ matrix (m, n) >= 0 in the Frobenius norm; fp32, on matrix's device.

    Stops when b moves by less than tol (relative) or after `iters` rounds; the result is balanced
    so mean(a) == mean(b) (what sklearn's NMF with its random init roughly ends at).
    """
    A = matrix.float()
    require(bool((A >= 0).all()), "rank1_nmf needs a non-negative matrix (pass |W|)")
    b = A.mean(dim=0)  # (n,)
    for _ in range(iters):
        a = A @ b / b.dot(b).clamp_min(_TINY)  # (m,)
        new_b = A.T @ a / a.dot(a).clamp_min(_TINY)  # (n,)
        moved = (new_b - b).norm() <= tol * new_b.norm()
        b = new_b
        if moved:
            break
    a = A @ b / b.dot(b).clamp_min(_TINY)
    return _balance_means(a, b)


def rank1_svd(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """|u1| sqrt(s1), |v1| sqrt(s1) from the leading singular triple of matrix (m, n): the SVD ablation."""
    U, S, Vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    root = S[0].sqrt()
    return U[:, 0].abs() * root, Vh[0].abs() * root


def _balance_means(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    ma, mb = a.mean(), b.mean()
    if ma <= 0 or mb <= 0:
        return a, b  # an all-zero factor: nothing to balance
    c = (mb / ma).sqrt()
    return a * c, b / c


@torch.no_grad()
def svid(weight: Tensor, init: str = "svid", iters: int = 50) -> tuple[Tensor, Tensor, Tensor]:
    """(signs (out, in) ±1, h (out,), g (in,)) of a weight (out, in), all fp32 on weight's device."""
    require(init in INITS, f"init.method='{init}' is not known; use one of {list(INITS)}")
    w = weight.float()
    magnitude = w.abs()
    h, g = rank1_nmf(magnitude, iters) if init == "svid" else rank1_svd(magnitude)
    return binarize(w), h, g
