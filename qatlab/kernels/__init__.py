"""Triton GEMV kernels for packed weights, and when the packed layers use them.

Triton is optional (torch's CUDA wheels ship it; `pip install -e ".[kernels]"` elsewhere). The kernel
modules import it at the top, so import them only after `HAVE_TRITON` says it is there. The packed
layers call a kernel only for CUDA tensors in fp16/bf16 with at most MAX_TOKENS tokens (decoding);
everything else takes their plain-torch fallback. QATLAB_KERNELS=0 turns the kernels off (to
time or check the fallback on a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from qatlab.quantizers.codes import Grid

HAVE_TRITON = importlib.util.find_spec("triton") is not None
MAX_TOKENS = 16  # the kernels hold a (16, BLOCK_N) accumulator: one tensor-core tile of tokens
KERNEL_BITS = (2, 4, 8)  # 32 / bits codes per word must be a power of two (tl.arange)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def enabled() -> bool:
    return os.environ.get("QATLAB_KERNELS", "1") != "0"


def use_kernel(x: Tensor, in_features: int) -> bool:
    """True when x (..., in) should go through a Triton GEMV instead of the torch fallback."""
    tokens = x.numel() // in_features
    return x.is_cuda and x.dtype in HALF_DTYPES and 0 < tokens <= MAX_TOKENS and HAVE_TRITON and enabled()


def int_grid_supported(grid: Grid, scale_rows: int, out_features: int) -> bool:
    """Affine codes of 2/4/8 bits with one scale per group or per output channel (not one per tensor)."""
    return grid.kind == "affine" and grid.bits in KERNEL_BITS and scale_rows == out_features
