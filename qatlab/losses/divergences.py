"""Distillation losses as pure functions of logits: forward KL, reverse KL, CAKLD, JSD.

Each takes (B, T, V) student and teacher logits and an optional (B, T) mask (1 = token counts),
and returns the mean over counted tokens; gradients reach the student logits only.

All math runs in fp32 on chunks of tokens, so the (tokens, vocab) fp32 upcast never exists for
the whole batch at once: the forward pass and the analytic backward both walk the same chunks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qatlab.errors import QatlabError
from qatlab.losses.topk import TopKLogits, topk_cakld, topk_top1_probability_sum

DEFAULT_CHUNK = 1024  # tokens per chunk: 1024 x 49152 fp32 = 200 MB peak for the upcast


def _flatten(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None):
    """(B, T, V) logits and (B, T) mask -> (N, V), (N, V) rows that count."""
    vocab = student_logits.shape[-1]
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} differ; teacher and student must share a tokenizer"
        )
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s, t = s[keep], t[keep]
    return s, t


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """KL(teacher || student) per token, averaged over the tokens where mask is 1.

    Equals LLM-QAT's soft-label cross-entropy minus the (constant) teacher entropy.
    Shapes: logits (B, T, V), mask (B, T). Gradients flow to the student only.
    teacher_logits may be a TopKLogits (the teacher cache): then the sparse top-k version runs.
    """
    if isinstance(teacher_logits, TopKLogits):
        return topk_cakld(student_logits, teacher_logits, mask, gamma=0.0, chunk_size=chunk_size)
    s, t = _flatten(student_logits, teacher_logits.detach(), mask)
    return _ChunkedDivergence.apply(s, t, _KLMix(0.0), chunk_size)


def reference_forward_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Unchunked textbook KL(T||S), mean over tokens: the check for the chunked version."""
    log_ps = torch.log_softmax(student_logits.float(), dim=-1)
    log_pt = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


# ---- reverse KL, CAKLD, JSD: one chunked Function, a divergence supplies value and gradient -------
#
# Per token, with log-probabilities ls = log_softmax(s), lt = log_softmax(t), p = exp(ls), q = exp(lt):
#   KL(S||T) = sum p (ls - lt)                 d/ds = p * (d - KL(S||T)),   d = ls - lt
#   KL(T||S) = sum q (lt - ls)                 d/ds = p - q
#   JSD_b    = b KL(T||M) + (1-b) KL(S||M),    M = b q + (1 - b) p
#                                              d/ds = (1-b) p * (a - KL(S||M)),   a = ls - log M
# (the JSD form: dJSD/dp_i = (1-b) log(p_i / M_i), then the softmax Jacobian p_j (delta_ij - p_i)).


class _KLMix:
    """gamma * KL(S||T) + (1 - gamma) * KL(T||S): gamma=1 is reverse KL, gamma=0 forward KL."""

    def __init__(self, gamma: float):
        self.gamma = gamma

    # A term whose weight is 0 is skipped: plain forward KL pays for nothing else.
    def value(self, ls: Tensor, lt: Tensor) -> Tensor:  # (n, V) -> (n,)
        d = ls - lt
        total = torch.zeros(ls.shape[:-1], device=ls.device)
        if self.gamma:
            total += self.gamma * (ls.exp() * d).sum(-1)
        if self.gamma != 1:
            total -= (1 - self.gamma) * (lt.exp() * d).sum(-1)
        return total

    def grad(self, ls: Tensor, lt: Tensor) -> Tensor:  # (n, V) -> (n, V)
        p = ls.exp()
        total = (1 - self.gamma) * (p - lt.exp()) if self.gamma != 1 else torch.zeros_like(p)
        if self.gamma:
            d = ls - lt
            total += self.gamma * p * (d - (p * d).sum(-1, keepdim=True))
        return total


class _JSD:
    """b * KL(T||M) + (1 - b) * KL(S||M) with M = b * p_T + (1 - b) * p_S (b = 0.5: the symmetric JSD)."""

    def __init__(self, beta: float):
        self.beta = beta

    def _log_m(self, ls: Tensor, lt: Tensor) -> Tensor:
        log_b = math.log(self.beta) if self.beta > 0 else -math.inf
        log_1b = math.log(1 - self.beta) if self.beta < 1 else -math.inf
        return torch.logaddexp(lt + log_b, ls + log_1b)

    def value(self, ls: Tensor, lt: Tensor) -> Tensor:
        log_m = self._log_m(ls, lt)
        to_teacher = (lt.exp() * (lt - log_m)).sum(-1)
        to_student = (ls.exp() * (ls - log_m)).sum(-1)
        return self.beta * to_teacher + (1 - self.beta) * to_student

    def grad(self, ls: Tensor, lt: Tensor) -> Tensor:
        p, a = ls.exp(), ls - self._log_m(ls, lt)
        return (1 - self.beta) * p * (a - (p * a).sum(-1, keepdim=True))


class _ChunkedDivergence(torch.autograd.Function):
    """mean_i D(s_i, t_i) over rows, computed and differentiated chunk by chunk in fp32."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, div, chunk: int) -> Tensor:  # s, t: (N, V)
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        for i in range(0, s.shape[0], chunk):
            total += div.value(*_log_probs(s[i : i + chunk], t[i : i + chunk])).sum()
        ctx.save_for_backward(s, t)
        ctx.div, ctx.chunk = div, chunk
        return total / max(s.shape[0], 1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        s, t = ctx.saved_tensors
        grad = torch.empty_like(s)
        scale = grad_out.float() / max(s.shape[0], 1)
        for i in range(0, s.shape[0], ctx.chunk):
            rows = slice(i, i + ctx.chunk)
            grad[rows] = (ctx.div.grad(*_log_probs(s[rows], t[rows])) * scale).to(s.dtype)
        return grad, None, None, None


def _log_probs(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    return torch.log_softmax(s.float(), dim=-1), torch.log_softmax(t.float(), dim=-1)


def _check_weight(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}={value} must lie in [0, 1]")


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """KL(student || teacher) per token (mode-seeking), averaged over the tokens where mask is 1."""
    if isinstance(teacher_logits, TopKLogits):
        return topk_cakld(student_logits, teacher_logits, mask, gamma=1.0, chunk_size=chunk_size)
    s, t = _flatten(student_logits, teacher_logits.detach(), mask)
    return _ChunkedDivergence.apply(s, t, _KLMix(1.0), chunk_size)


def cakld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    gamma: float,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """BitDistiller's confidence-aware KL: gamma * KL(S||T) + (1 - gamma) * KL(T||S), token mean.

    gamma is the teacher's mean top-1 probability (see top1_probability_sum): a confident teacher
    weighs the mode-seeking reverse KL more. gamma=0 is forward_kl, gamma=1 reverse_kl.
    """
    _check_weight("gamma", gamma)
    if isinstance(teacher_logits, TopKLogits):
        return topk_cakld(student_logits, teacher_logits, mask, gamma=float(gamma), chunk_size=chunk_size)
    s, t = _flatten(student_logits, teacher_logits.detach(), mask)
    return _ChunkedDivergence.apply(s, t, _KLMix(float(gamma)), chunk_size)


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Generalized Jensen-Shannon divergence beta*KL(T||M) + (1-beta)*KL(S||M), M = beta*T + (1-beta)*S.

    beta=0.5 (BitDistiller's and GKD's default) is the symmetric JSD, bounded by log 2.
    """
    _check_weight("beta", beta)
    if isinstance(teacher_logits, TopKLogits):
        raise QatlabError("jsd has no top-k form; with teacher_cache.enabled=true use forward_kl, reverse_kl or cakld")
    s, t = _flatten(student_logits, teacher_logits.detach(), mask)
    return _ChunkedDivergence.apply(s, t, _JSD(float(beta)), chunk_size)


@torch.no_grad()
def top1_probability_sum(
    teacher_logits: Tensor, mask: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK
) -> tuple[Tensor, int]:
    """(sum over kept tokens of max_c p_T(c), number of kept tokens), fp32, chunked: for CAKLD's gamma."""
    if isinstance(teacher_logits, TopKLogits):
        return topk_top1_probability_sum(teacher_logits, mask)
    _, t = _flatten(teacher_logits, teacher_logits, mask)
    total = torch.zeros((), dtype=torch.float32, device=t.device)
    for i in range(0, t.shape[0], chunk_size):
        chunk = t[i : i + chunk_size].float()
        # max softmax = exp(max logit - logsumexp)
        total += (chunk.amax(-1) - torch.logsumexp(chunk, dim=-1)).exp().sum()
    return total, t.shape[0]


# ---- unchunked textbook versions: the references the tests hold the chunked ones to -------------


def reference_reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    log_ps = torch.log_softmax(student_logits.float(), dim=-1)
    log_pt = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean()


def reference_cakld(student_logits: Tensor, teacher_logits: Tensor, gamma: float) -> Tensor:
    return gamma * reference_reverse_kl(student_logits, teacher_logits) + (1 - gamma) * reference_forward_kl(
        student_logits, teacher_logits
    )


def reference_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5) -> Tensor:
    p_s = torch.softmax(student_logits.float(), dim=-1)
    p_t = torch.softmax(teacher_logits.float(), dim=-1)
    m = beta * p_t + (1 - beta) * p_s
    to_teacher = (p_t * (p_t.log() - m.log())).sum(-1)
    to_student = (p_s * (p_s.log() - m.log())).sum(-1)
    return (beta * to_teacher + (1 - beta) * to_student).mean()


# ---- hidden-state matching (OneBit) ---------------------------------------------------------------


def normalized_hidden_mse(
    student_hidden: tuple[Tensor, ...] | list[Tensor],
    teacher_hidden: tuple[Tensor, ...] | list[Tensor],
    mask: Tensor | None = None,
) -> Tensor:
    """Sum over layers of the mean over counted tokens of ||t/|t| - s/|s|||^2, fp32.

    OneBit's hidden-state term: each (B, T, C) hidden state is L2-normalized per token, so the
    term matches directions, not scales (the per-token value lies in [0, 4]: 2 - 2 cos). Pass
    the per-layer tuples of the same length (e.g. `hidden_states[1:]`); mask (B, T), 1 = counts.
    Gradients reach the student only.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"{len(student_hidden)} student and {len(teacher_hidden)} teacher hidden states; "
            "teacher and student must have the same number of layers"
        )
    keep = None if mask is None else mask.reshape(-1).bool()
    terms = []
    for s, t in zip(student_hidden, teacher_hidden):
        s = torch.nn.functional.normalize(s.float().reshape(-1, s.shape[-1]), dim=-1)  # (N, C)
        t = torch.nn.functional.normalize(t.detach().float().reshape(-1, t.shape[-1]), dim=-1)
        if keep is not None:
            s, t = s[keep], t[keep]
        terms.append((s - t).pow(2).sum(-1).mean())
    return torch.stack(terms).sum()
