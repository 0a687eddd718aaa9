"""What the packed GEMV kernels share: tile configs, autotuning on CUDA, a fixed tile in the interpreter.

Both kernels own BLOCK_N output features per program and every SPLIT_K-th K tile, and add their
partial sums into a zeroed fp32 output with atomics; BLOCK_B = 16 token rows (one tensor-core tile;
fewer tokens are masked). On CUDA, triton.autotune picks the tile per (tokens, N, K); off CUDA
(TRITON_INTERPRET=1 on CPU tensors, for tests) a fixed small tile runs, since autotuning times
configs with CUDA events.
The kernels call only Triton builtins (tl.full, not the @jit helpers tl.zeros / tl.cdiv): the CPU
interpreter then runs them even when Triton was imported before TRITON_INTERPRET was set, as it is
in a test process (lightning imports it).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
from torch import Tensor

from qatlab.errors import require
from qatlab.kernels import MAX_TOKENS

BLOCK_B = 16


def _configs() -> list[triton.Config]:
    tiles = [(16, 256), (32, 128), (32, 256), (64, 128), (64, 64), (128, 64)]  # (BLOCK_N, BLOCK_K)
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": split}, num_warps=4, num_stages=3)
        for n, k in tiles for split in (1, 2, 4, 8)
    ]


CONFIGS = _configs()
INTERPRET_TILE = {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2}  # K-splits and tails stay covered by tests


def autotuned(kernel: Any) -> Any:
    """The kernel wrapped in triton.autotune; the fp32 output is re-zeroed between trial configs."""
    return triton.autotune(configs=CONFIGS, key=["B", "N", "K"], reset_to_zero=["out_ptr"])(kernel)


def as_tokens(x: Tensor) -> Tensor:
    """x (..., K) -> contiguous (B, K), B <= MAX_TOKENS."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    require(0 < x2.shape[0] <= MAX_TOKENS,
            f"the packed GEMV kernels take 1-{MAX_TOKENS} tokens, not {x2.shape[0]}; use the torch fallback")
    return x2


def run(kernel: Any, tuned: Any, out: Tensor, args: tuple, consts: dict[str, Any],
        tile: dict[str, int] | None = None) -> None:
    """Launch on grid (N tiles, SPLIT_K): autotuned on CUDA unless `tile` is given, else the fixed tile."""
    n = out.shape[1]

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"]

    if out.is_cuda and tile is None:
        tuned[grid](*args, **consts, BLOCK_B=BLOCK_B)
        return
    tile = tile or INTERPRET_TILE
    kernel[grid(tile)](*args, **consts, BLOCK_B=BLOCK_B, **tile)


def zeroed_output(x2: Tensor, n: int) -> Tensor:
    return torch.zeros(x2.shape[0], n, device=x2.device, dtype=torch.float32)  # (B, N) fp32 partial sums
