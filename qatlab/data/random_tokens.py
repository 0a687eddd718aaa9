"""Random-token calibration data: token ids drawn uniformly over the vocabulary, seeded.

ZeroQuant's LKD needs no labels and no original training data; even random tokens give the
blocks inputs to match the teacher on. The same seed gives the same tokens on every machine.
"""

from __future__ import annotations

import torch

from qatlab.errors import require


def random_token_batches(
    vocab_size: int, samples: int, seq_len: int, batch_size: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """`samples` sequences of `seq_len` uniform ids in [0, vocab_size), as batches of <= batch_size rows.

    Each batch is {"input_ids": (B, T) int64, "attention_mask": (B, T) ones}, like a corpus batch.
    """
    for key, value in (("samples", samples), ("seq_len", seq_len), ("batch_size", batch_size),
                       ("vocab_size", vocab_size)):
        require(isinstance(value, int) and value > 0, f"random tokens: {key}={value!r} must be a positive integer")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (samples, seq_len), generator=generator)
    return [{"input_ids": rows, "attention_mask": torch.ones_like(rows)} for rows in ids.split(batch_size)]
