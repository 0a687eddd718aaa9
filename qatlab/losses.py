"""Distillation losses as pure functions of logits.

All math runs in fp32 on chunks of tokens, so the (tokens, vocab) fp32 upcast never exists for
the whole batch at once: the forward pass and the analytic backward both walk the same chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

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


class _ForwardKL(torch.autograd.Function):
    """mean_i KL(p_T,i || p_S,i); d/ds = (softmax(s) - softmax(t)) / N, recomputed per chunk."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, chunk: int) -> Tensor:  # s, t: (N, V)
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        for i in range(0, s.shape[0], chunk):
            log_ps = torch.log_softmax(s[i : i + chunk].float(), dim=-1)
            log_pt = torch.log_softmax(t[i : i + chunk].float(), dim=-1)
            total += (log_pt.exp() * (log_pt - log_ps)).sum()
        ctx.save_for_backward(s, t)
        ctx.chunk = chunk
        return total / max(s.shape[0], 1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        s, t = ctx.saved_tensors
        grad = torch.empty_like(s)
        scale = grad_out.float() / max(s.shape[0], 1)
        for i in range(0, s.shape[0], ctx.chunk):
            p_s = torch.softmax(s[i : i + ctx.chunk].float(), dim=-1)
            p_t = torch.softmax(t[i : i + ctx.chunk].float(), dim=-1)
            grad[i : i + ctx.chunk] = ((p_s - p_t) * scale).to(s.dtype)
        return grad, None, None


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """KL(teacher || student) per token, averaged over the tokens where mask is 1.

    Equals LLM-QAT's soft-label cross-entropy minus the (constant) teacher entropy.
    Shapes: logits (B, T, V), mask (B, T). Gradients flow to the student only.
    """
    s, t = _flatten(student_logits, teacher_logits.detach(), mask)
    return _ForwardKL.apply(s, t, chunk_size)


def reference_forward_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Unchunked textbook KL(T||S), mean over tokens: the check for the chunked version."""
    log_ps = torch.log_softmax(student_logits.float(), dim=-1)
    log_pt = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
