"""Pack unsigned b-bit codes (1 <= b <= 8) into int32 words along the last dim, and back.

Layout: each word holds `per_word = 32 // b` codes; element `per_word * j + k` of a row is bits
[k * b, (k + 1) * b) of word j (least significant first). So 1-bit signs pack 32 per word, 2-bit
16, 4-bit 8, 8-bit 4, and 3-bit 10 (the top 2 bits of each word stay 0: 3.2 bits per code, kept
for a layout one shift and one mask decode, the same in torch and in the Triton kernels).
A row whose length is not a multiple of per_word is padded with 0 codes; unpack needs the true
length to drop them. Words are int32 (safetensors and Triton both have it); a code in the top
bits makes the word negative, and `(word >> shift) & mask` still reads it back exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qatlab.errors import require

WORD_BITS = 32


def codes_per_word(bits: int) -> int:
    require(isinstance(bits, int) and 1 <= bits <= 8, f"pack bits={bits!r}: use 1-8")
    return WORD_BITS // bits


def packed_width(n: int, bits: int) -> int:
    """Words per row of n codes."""
    return -(-n // codes_per_word(bits))


def _shifts(bits: int, device: torch.device) -> Tensor:
    return torch.arange(codes_per_word(bits), device=device, dtype=torch.int64) * bits  # (per_word,)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """(..., n) integer codes in [0, 2^bits) -> (..., ceil(n / per_word)) int32."""
    require(not codes.is_floating_point(), f"pack_codes takes integer codes, not {codes.dtype}")
    codes = codes.to(torch.int64)
    if codes.numel():
        require(int(codes.min()) >= 0 and int(codes.max()) < 2**bits,
                f"codes must lie in [0, {2**bits - 1}] to pack into {bits} bits; offset signed codes first")
    per_word = codes_per_word(bits)
    pad = -codes.shape[-1] % per_word
    codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], -1, per_word)  # (..., words, per_word)
    words = (codes << _shifts(bits, codes.device)).sum(dim=-1)  # disjoint bits: sum == bitwise or
    words = torch.where(words >= 2**31, words - 2**32, words)  # the uint32 pattern as int32
    return words.to(torch.int32)


def unpack_codes(words: Tensor, bits: int, n: int) -> Tensor:
    """(..., words) int32 -> (..., n) uint8 codes."""
    require(words.dtype == torch.int32, f"unpack_codes takes int32 words, not {words.dtype}")
    shifted = words.unsqueeze(-1).to(torch.int64) >> _shifts(bits, words.device)  # (..., words, per_word)
    codes = (shifted & (2**bits - 1)).reshape(*words.shape[:-1], -1)
    require(codes.shape[-1] >= n, f"{words.shape[-1]} words hold {codes.shape[-1]} codes, fewer than n={n}")
    return codes[..., :n].to(torch.uint8)


def pack_dense(codes: Tensor, bits: int) -> Tensor:
    """(rows, n) codes in [0, 2^bits) -> (rows, ceil(n * bits / 32)) int32, with NO unused bits: element i of a row
    is bits [i * bits, (i + 1) * bits) of the row's bit stream, least significant first, straddling two words where
    it must (compressed-tensors' pack-quantized layout; for bits 1, 2, 4, 8 it equals `pack_codes`)."""
    require(not codes.is_floating_point() and codes.dim() == 2, f"pack_dense takes (rows, n) integer codes, not {codes.dtype} {tuple(codes.shape)}")
    codes_per_word(bits)
    codes = codes.to(torch.int64)
    if codes.numel():
        require(int(codes.min()) >= 0 and int(codes.max()) < 2**bits, f"codes must lie in [0, {2**bits - 1}] to pack into {bits} bits")
    rows, n = codes.shape
    chunks = -(-n // WORD_BITS)  # 32 codes fill exactly `bits` words
    codes = torch.nn.functional.pad(codes, (0, chunks * WORD_BITS - n)).reshape(rows, chunks, WORD_BITS)
    start = torch.arange(WORD_BITS, device=codes.device, dtype=torch.int64) * bits  # bit offset of each code
    word, offset = start // WORD_BITS, start % WORD_BITS
    words = torch.zeros(rows, chunks, bits + 1, dtype=torch.int64, device=codes.device)  # +1: spill of the last code
    words.scatter_add_(2, word.expand(rows, chunks, -1), (codes << offset) & 0xFFFFFFFF)
    spill = codes >> (WORD_BITS - offset)  # the high bits that cross into the next word (0 where none do)
    words.scatter_add_(2, (word + 1).expand(rows, chunks, -1), torch.where(offset + bits > WORD_BITS, spill, 0))
    words = words[..., :bits].reshape(rows, -1)[:, : -(-n * bits // WORD_BITS)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # disjoint bits: the sum is the or
