"""Fused GEMV for OneBit layers: y (B, N) = ((x * g) @ S^T) * h, before OneBit's LayerNorm.

S[n, k] = +1 where bit k of row n is set, else -1 (signs packed 32 per int32 word by
qatlab.export.bitpack, least significant first); g (K,) and h (N,) are the layer's value vectors.
In registers, per K tile: load the words (BLOCK_N, BLOCK_K / 32), unpack to ±1, scale the activation
tile by g, accumulate with tl.dot in fp32 (tokens padded to 16 rows); h multiplies each K-split's
partial sum before the atomic add. The LayerNorm and bias stay in torch (qatlab.export.packed_onebit).
Requires Triton: import this module only when qatlab.kernels.HAVE_TRITON.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from qatlab.kernels import launch


@triton.jit
def sign_gemv_kernel(
    x_ptr, q_ptr, g_ptr, h_ptr, out_ptr,
    B, N, K,
    stride_xb, stride_qn, stride_ob,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    WORDS: tl.constexpr = BLOCK_K // 32
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    tokens = tl.arange(0, BLOCK_B)
    shifts = tl.arange(0, 32)
    row_ok = rows < N
    acc = tl.full((BLOCK_B, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: see qatlab.kernels.launch
    for tile in range(tl.program_id(1), (K + BLOCK_K - 1) // BLOCK_K, SPLIT_K):
        cols = tile * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        col_ok = cols < K
        words = tile * WORDS + tl.arange(0, WORDS)
        q = tl.load(q_ptr + rows[:, None] * stride_qn + words[None, :],
                    mask=row_ok[:, None] & (words[None, :] * 32 < K), other=0)
        bits = (q[:, :, None] >> shifts[None, None, :]) & 1  # (BLOCK_N, WORDS, 32)
        signs = tl.reshape(bits, (BLOCK_N, BLOCK_K)).to(tl.float32) * 2.0 - 1.0
        x = tl.load(x_ptr + tokens[:, None] * stride_xb + cols[None, :],
                    mask=(tokens[:, None] < B) & col_ok[None, :], other=0.0)  # (BLOCK_B, BLOCK_K)
        g = tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        xg = (x.to(tl.float32) * g[None, :]).to(x.dtype)  # x * g rounded to x's dtype, as in torch
        acc += tl.dot(xg, tl.trans(signs.to(x.dtype)))
    h = tl.load(h_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    out = out_ptr + tokens[:, None] * stride_ob + rows[None, :]
    tl.atomic_add(out, acc * h[None, :], mask=(tokens[:, None] < B) & row_ok[None, :])


tuned_sign_gemv_kernel = launch.autotuned(sign_gemv_kernel)


def sign_gemv(x: Tensor, qweight: Tensor, g: Tensor, h: Tensor, tile: dict[str, int] | None = None) -> Tensor:
    """x (..., K) with 1-16 tokens, qweight (N, ceil(K / 32)) int32, g (K,), h (N,) -> (..., N) in x's dtype.

    tile: a fixed {BLOCK_N, BLOCK_K, SPLIT_K} instead of autotuning (always used off CUDA).
    """
    x2 = launch.as_tokens(x)
    n, k = qweight.shape[0], x2.shape[1]
    out = launch.zeroed_output(x2, n)
    args = (x2, qweight, g.contiguous(), h.contiguous(), out, x2.shape[0], n, k,
            x2.stride(0), qweight.stride(0), out.stride(0))
    launch.run(sign_gemv_kernel, tuned_sign_gemv_kernel, out, args, {}, tile)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
