"""Token perplexity under ONE pinned protocol.

Protocol (the same for teacher, RTN and student, every run):
  - the split's documents, in their fixed order, are joined with "\\n\\n" and tokenized once
    without special tokens (no BOS), see qatlab.data.packing;
  - the token stream is cut into non-overlapping windows of `eval_block_size` tokens
    (default 1024, stride = window), the last partial window is dropped;
  - each window is scored independently: the loss covers tokens 2..T of the window (the first
    token has no context), every window weighs by its token count;
  - PPL = exp(total NLL / total predicted tokens), NLL from log_softmax in fp32.
A capped evaluation (CPU default) scores the FIRST n windows of the split and says so.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from tqdm.auto import tqdm


class TokenPerplexity(torchmetrics.Metric):
    """exp(mean token NLL), accumulated as (sum NLL, count) so it reduces across ranks.

    torchmetrics.text.Perplexity takes softmax then log, which underflows to inf for the
    near-zero probabilities a collapsed 2-bit model assigns; this uses log_softmax instead.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, input_ids: Tensor) -> None:  # (B, T, V), (B, T)
        nll = next_token_nll(logits, input_ids)
        self.nll_sum += nll.sum().double()
        self.count += nll.numel()

    def compute(self) -> Tensor:
        return torch.exp(self.nll_sum / self.count.clamp(min=1))


def next_token_nll(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Per-token NLL of tokens 2..T given their prefix, fp32: (B, T, V), (B, T) -> (B, T-1)."""
    shifted = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    blocks: Tensor,
    batch_size: int = 1,
    max_blocks: int | None = None,
    desc: str = "perplexity",
) -> float:
    """Pinned-protocol PPL of `model` on packed (N, T) blocks; the first max_blocks if given."""
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    device = next(model.parameters()).device
    metric = TokenPerplexity().to(device)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, unit="block", leave=False):
        ids = blocks[start : start + batch_size].to(device)
        metric.update(model(input_ids=ids).logits, ids)
    model.train(was_training)
    value = metric.compute().item()
    return value if math.isfinite(value) else float("inf")
