"""Sparse distillation losses on the teacher's top-k log-probabilities (the teacher-logit cache).

The approximation (exact when k = vocab): the teacher's distribution is kept on its k most likely
tokens plus one "rest" bucket holding the remaining mass, renormalized over those k + 1 buckets.
The student's distribution is gathered onto the same k tokens plus its own rest mass (every other
token summed). Forward KL, reverse KL and CAKLD are then the ordinary divergences between these
two (k + 1)-bucket distributions. With k = vocab the rest buckets are empty and the values and
gradients equal the full-vocabulary ones.

Like qatlab.losses, the math runs in fp32 on chunks of tokens with an analytic backward, so the
(tokens, vocab) fp32 upcast of the student's logits never exists for the whole batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qatlab.errors import require

DEFAULT_CHUNK = 1024
LOG_FLOOR = -80.0  # exp(-80) ~ 2e-35 > fp32 tiny: a present bucket never underflows to exactly 0


@dataclass
class TopKLogits:
    """A teacher's top-k log-probabilities per token: what the logit cache stores.

    indices (B, T, k) int, token ids sorted by teacher probability (most likely first);
    logprobs (B, T, k) float, log p_T of those tokens; log_rest (B, T) float, log of the mass of
    every other token (-inf when k = vocab).
    """

    indices: Tensor
    logprobs: Tensor
    log_rest: Tensor

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def to(self, device) -> TopKLogits:
        return TopKLogits(self.indices.to(device), self.logprobs.to(device), self.log_rest.to(device))


@dataclass
class CachedTeacherOutput:
    """Stands in for a teacher's model output when the logits come from the cache (no hidden states)."""

    logits: TopKLogits
    hidden_states: None = None


@torch.no_grad()
def topk_from_logits(logits: Tensor, k: int) -> TopKLogits:
    """(B, T, V) teacher logits -> their top-k log-probabilities and the log-mass of the rest, fp32."""
    require(1 <= k <= logits.shape[-1], f"teacher_cache.k={k} must lie in [1, vocab={logits.shape[-1]}]")
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    values, indices = logp.topk(k, dim=-1)  # sorted, most likely first
    log_rest = torch.logsumexp(logp.scatter(-1, indices, -torch.inf), dim=-1)  # (B, T); -inf when k = V
    return TopKLogits(indices, values, log_rest)


# ---- the losses ----------------------------------------------------------------------------------


def topk_forward_kl(student_logits: Tensor, teacher: TopKLogits, mask: Tensor | None = None,
                    chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """KL(T || S) over the k + 1 buckets, mean over the tokens where mask is 1."""
    return topk_cakld(student_logits, teacher, mask, gamma=0.0, chunk_size=chunk_size)


def topk_reverse_kl(student_logits: Tensor, teacher: TopKLogits, mask: Tensor | None = None,
                    chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """KL(S || T) over the k + 1 buckets, mean over the tokens where mask is 1."""
    return topk_cakld(student_logits, teacher, mask, gamma=1.0, chunk_size=chunk_size)


def topk_cakld(student_logits: Tensor, teacher: TopKLogits, mask: Tensor | None = None, *,
               gamma: float, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """gamma * KL(S||T) + (1 - gamma) * KL(T||S) over the k + 1 buckets, token mean."""
    require(0.0 <= gamma <= 1.0, f"gamma={gamma} must lie in [0, 1]")
    s, idx, lt, rest = _flatten(student_logits, teacher, mask)
    return _TopKDivergence.apply(s, idx, lt, rest, float(gamma), chunk_size)


@torch.no_grad()
def topk_top1_probability_sum(teacher: TopKLogits, mask: Tensor | None = None) -> tuple[Tensor, int]:
    """(sum over kept tokens of the teacher's top-1 probability, number of kept tokens): CAKLD's gamma."""
    top1 = teacher.logprobs.float().amax(-1).exp().reshape(-1)  # (N,)
    if mask is not None:
        top1 = top1[mask.reshape(-1).bool()]
    return top1.sum(), top1.numel()


def _flatten(student_logits: Tensor, teacher: TopKLogits, mask: Tensor | None):
    """(B, T, V) logits + top-k teacher -> (N, V), (N, k), (N, k), (N,) rows that count."""
    require(
        teacher.indices.shape[:-1] == student_logits.shape[:-1],
        f"cached teacher top-k {tuple(teacher.indices.shape)} does not match student logits "
        f"{tuple(student_logits.shape)}; was the cache built for these blocks?",
    )
    k, vocab = teacher.k, student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    idx = teacher.indices.reshape(-1, k).long()
    lt = teacher.logprobs.reshape(-1, k)
    rest = teacher.log_rest.reshape(-1)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s, idx, lt, rest = s[keep], idx[keep], lt[keep], rest[keep]
    return s, idx, lt, rest


# ---- one chunked autograd Function ---------------------------------------------------------------
#
# Buckets j = 1..k (the teacher's top-k tokens) and j = k+1 (the rest). Student bucket probabilities
# P_j = sum of p_v over the bucket's tokens, teacher Q_j. For a loss L(P), the softmax chain rule
# gives dL/ds_v = p_v * (g_j(v) - sum_j P_j g_j) with g_j = dL/dP_j and j(v) the bucket of token v:
#   KL(T||S) = sum Q (lQ - lP)     g_j = -Q_j / P_j
#   KL(S||T) = sum P (lP - lQ)     g_j = lP_j - lQ_j + 1   (the +1 cancels in the centred form)


class _TopKDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: Tensor, idx: Tensor, lt: Tensor, rest: Tensor, gamma: float, chunk: int) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        for i in range(0, s.shape[0], chunk):
            rows = slice(i, i + chunk)
            _, lp, lq, present = _buckets(s[rows], idx[rows], lt[rows], rest[rows])
            total += _value(lp, lq, present, gamma).sum()
        ctx.save_for_backward(s, idx, lt, rest)
        ctx.gamma, ctx.chunk = gamma, chunk
        return total / max(s.shape[0], 1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        s, idx, lt, rest = ctx.saved_tensors
        grad = torch.empty_like(s)
        scale = grad_out.float() / max(s.shape[0], 1)
        for i in range(0, s.shape[0], ctx.chunk):
            rows = slice(i, i + ctx.chunk)
            ls, lp, lq, present = _buckets(s[rows], idx[rows], lt[rows], rest[rows])
            g = _bucket_grad(lp, lq, present, ctx.gamma)  # (n, k + 1)
            per_token = g[:, -1:].expand_as(ls).scatter(-1, idx[rows], g[:, :-1])  # (n, V): g of each token's bucket
            centre = (lp.exp() * g).sum(-1, keepdim=True)
            grad[rows] = (ls.exp() * (per_token - centre) * scale).to(s.dtype)
        return grad, None, None, None, None, None


def _buckets(s: Tensor, idx: Tensor, lt: Tensor, rest: Tensor):
    """Student log-probs (n, V) and bucket log-probs lp, lq (n, k + 1) with a present mask (n, k + 1)."""
    ls = torch.log_softmax(s.float(), dim=-1)
    lp = torch.cat([ls.gather(-1, idx), torch.logsumexp(ls.scatter(-1, idx, -torch.inf), -1, keepdim=True)], -1)
    lq = torch.cat([lt.float(), rest.float()[:, None]], -1)
    lq = lq - torch.logsumexp(lq, -1, keepdim=True)  # renormalize the stored (possibly fp16) buckets
    present = torch.isfinite(lp) | torch.isfinite(lq)  # the rest bucket is absent when k = vocab
    lp = torch.where(present, lp.clamp_min(LOG_FLOOR), 0.0)
    lq = torch.where(present, lq.clamp_min(LOG_FLOOR), 0.0)
    return ls, lp, lq, present


def _value(lp: Tensor, lq: Tensor, present: Tensor, gamma: float) -> Tensor:  # -> (n,)
    d = lp - lq
    total = torch.zeros(lp.shape[:-1], device=lp.device)
    if gamma:
        total += gamma * torch.where(present, lp.exp() * d, 0.0).sum(-1)
    if gamma != 1:
        total -= (1 - gamma) * torch.where(present, lq.exp() * d, 0.0).sum(-1)
    return total


def _bucket_grad(lp: Tensor, lq: Tensor, present: Tensor, gamma: float) -> Tensor:  # -> (n, k + 1)
    g = torch.zeros_like(lp)
    if gamma != 1:
        g -= (1 - gamma) * (lq - lp).exp()
    if gamma:
        g += gamma * (lp - lq)
    return torch.where(present, g, 0.0)
