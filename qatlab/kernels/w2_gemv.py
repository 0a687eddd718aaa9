"""Fused GEMV for packed int weights: W2 g64 asymmetric is the target, any 2/4/8-bit int grid works.

y (B, N) = x (B, K) @ W^T (+ bias), with W[n, k] = (u[n, k] - z) * s[n, k // G]:
  u  the unsigned codes of qatlab.export.bitpack (32 / bits per int32 word, least significant first)
  s  the stored scale of the group (G = group_size, or K for per-channel scales)
  z  the stored zero point (asymmetric grids: qmin = 0, so u - z = code - zero), or the constant
     fixed_zero - qmin (symmetric: -qmin, so u - z = code; SEQ 2-bit: -0.5 + 2 = 1.5; qatlab.quantizers.codes)
In registers, per K tile: load the packed words (BLOCK_N, BLOCK_K / per_word), unpack with shifts
and a mask, dequantize in fp32 in primitives.dequantize's order ((code - zero) * scale), cast to the
activation dtype and accumulate x @ W^T in fp32 with tl.dot (tokens padded to 16 rows).
Requires Triton: import this module only when qatlab.kernels.HAVE_TRITON.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from qatlab.kernels import launch


@triton.jit
def int_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr,
    B, N, K, group_size,
    stride_xb, stride_qn, stride_sn, stride_zn, stride_ob,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, ZERO: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    tokens = tl.arange(0, BLOCK_B)
    shifts = tl.arange(0, PER_WORD) * BITS
    row_ok = rows < N
    acc = tl.full((BLOCK_B, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: see qatlab.kernels.launch
    for tile in range(tl.program_id(1), (K + BLOCK_K - 1) // BLOCK_K, SPLIT_K):
        cols = tile * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        col_ok = cols < K
        words = tile * WORDS + tl.arange(0, WORDS)  # (WORDS,)
        word_ok = row_ok[:, None] & (words[None, :] * PER_WORD < K)
        q = tl.load(q_ptr + rows[:, None] * stride_qn + words[None, :], mask=word_ok, other=0)
        u = (q[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # (BLOCK_N, WORDS, PER_WORD)
        u = tl.reshape(u, (BLOCK_N, BLOCK_K)).to(tl.float32)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        groups = cols[None, :] // group_size
        s = tl.load(s_ptr + rows[:, None] * stride_sn + groups, mask=tile_ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + rows[:, None] * stride_zn + groups, mask=tile_ok, other=0).to(tl.float32)
            w = (u - z) * s  # (BLOCK_N, BLOCK_K) fp32
        else:
            w = (u - ZERO) * s
        x = tl.load(x_ptr + tokens[:, None] * stride_xb + cols[None, :],
                    mask=(tokens[:, None] < B) & col_ok[None, :], other=0.0)  # (BLOCK_B, BLOCK_K)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    out = out_ptr + tokens[:, None] * stride_ob + rows[None, :]
    tl.atomic_add(out, acc, mask=(tokens[:, None] < B) & row_ok[None, :])


tuned_int_gemv_kernel = launch.autotuned(int_gemv_kernel)


def int_gemv(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int,
             zero_offset: float, bias: Tensor | None = None, tile: dict[str, int] | None = None) -> Tensor:
    """x (..., K) with 1-16 tokens, qweight (N, words) int32, scales/zeros (N, G) -> (..., N) in x's dtype.

    bits: code width; group_size: columns per scale (K for per-channel); zero_offset: the constant the
    unsigned codes are offset by when there is no zeros tensor (grid.fixed_zero - grid.qmin).
    tile: a fixed {BLOCK_N, BLOCK_K, SPLIT_K} instead of autotuning (always used off CUDA).
    """
    x2 = launch.as_tokens(x)
    n, k = qweight.shape[0], x2.shape[1]
    out = launch.zeroed_output(x2, n)
    z = zeros if zeros is not None else scales  # a valid pointer the kernel never reads
    args = (x2, qweight, scales, z, out, x2.shape[0], n, k, group_size,
            x2.stride(0), qweight.stride(0), scales.stride(0), z.stride(0), out.stride(0))
    consts = {"BITS": bits, "HAS_ZEROS": zeros is not None, "ZERO": zero_offset}
    launch.run(int_gemv_kernel, tuned_int_gemv_kernel, out, args, consts, tile)
    y = out.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)
