"""Training objectives of a whole-model stage: one class per loss, each a `conf/loss/<name>.yaml`.

A loss is called as loss(student_out, teacher_out, batch) -> {"loss": scalar, <parts>: detached}
and says what it needs (`needs_teacher`, `needs_hidden_states`), so the stage runs the teacher
only when a loss reads it and asks for hidden states only when they are used. Every loss takes
`hidden_mse: beta` to add OneBit's term beta * sum over layers of the MSE of L2-normalized hidden
states, so any logit loss composes with it (OneBit: forward KL + 0.05 x hidden MSE).

    forward_kl   KL(T || S) per token                        (LLM-QAT's soft CE, KD, OneBit)
    reverse_kl   KL(S || T) per token                        (MiniLLM)
    cakld        gamma KL(S||T) + (1 - gamma) KL(T||S)       (BitDistiller; gamma = teacher's mean top-1 prob)
    jsd          beta KL(T||M) + (1 - beta) KL(S||M)         (GKD)
    ce           next-token cross-entropy on the data        (ParetoQ, EfficientQAT's E2E-QP; no teacher)
    hidden_mse   only the normalized hidden-state term       (TED-style feature matching)
    block_mse    sum over blocks of the MSE of raw block outputs (Block-AP's objective, end to end)
The divergences accept the teacher cache's top-k logits (forward/reverse KL, CAKLD).

reduction (every loss but the hidden-state terms):
  token_mean    the mean over counted tokens (qatlab's; the same number at any sequence length)
  sequence_sum  the sum over each sequence's counted tokens, averaged over the batch: what the references
                compute (LLM-QAT's F.kl_div(..., reduction="batchmean"), BitDistiller's `.sum(-1).mean()`,
                OneBit's batchmean KL), = token_mean x counted tokens / sequences. With gradient clipping the
                difference matters: the gradient is seq_len times larger, so clipping bites far more.
scale multiplies that term (the references' kd_loss_scale: 1 in LLM-QAT and BitDistiller, 0.01 in OneBit).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from qatlab.errors import require
from qatlab.losses.divergences import cakld, forward_kl, jsd, normalized_hidden_mse, reverse_kl, top1_probability_sum

log = logging.getLogger("qatlab")

REDUCTIONS = ("token_mean", "sequence_sum")
GAMMA_MODES = ("prepass", "running")


class Loss:
    name = "loss"
    needs_teacher = True
    needs_logits = True  # the teacher's logits (False: hidden states only)

    def __init__(self, *, hidden_mse: float = 0.0, chunk_size: int = 1024, reduction: str = "token_mean",
                 scale: float = 1.0) -> None:
        for key, value in (("hidden_mse", hidden_mse), ("scale", scale)):
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0,
                    f"loss.{key}={value!r} must be a finite number >= 0")
        require(isinstance(chunk_size, int) and chunk_size > 0, f"loss.chunk_size={chunk_size!r} must be a positive integer")
        require(reduction in REDUCTIONS, f"loss.reduction={reduction!r} is not known; use one of {list(REDUCTIONS)}")
        self.hidden_mse = float(hidden_mse)
        self.chunk_size = chunk_size
        self.reduction = reduction
        self.scale = float(scale)

    @property
    def needs_hidden_states(self) -> bool:
        return self.hidden_mse > 0

    def main(self, student_out: Any, teacher_out: Any, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def __call__(self, student_out: Any, teacher_out: Any, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        parts = self.main(student_out, teacher_out, batch)
        total = parts.pop("loss")
        out = {self.name: total.detach(), **parts}  # logged as the per-token mean, whatever the reduction
        total = self.scale * total * self.sequence_factor(student_out, batch)
        if self.hidden_mse > 0:
            hidden = normalized_hidden_mse(student_out.hidden_states[1:], teacher_out.hidden_states[1:],
                                           batch.get("attention_mask"))
            total = total + self.hidden_mse * hidden
            out["hidden_mse"] = hidden.detach()
        return {"loss": total, **out}

    def sequence_factor(self, student_out: Any, batch: Mapping[str, Tensor]) -> float:
        """1 for token_mean; counted tokens / sequences for sequence_sum (token mean -> per-sequence sum, batch mean)."""
        if self.reduction == "token_mean":
            return 1.0
        mask = batch.get("attention_mask")
        ids = batch["input_ids"]
        counted = int(mask.sum()) if mask is not None else ids.numel()
        return counted / ids.shape[0]

    # -- before training / resume ---------------------------------------------------------------------
    def prepare(self, teacher: torch.nn.Module | None, batches: Iterable[Mapping[str, Tensor]]) -> None:
        """Measurements the loss needs before the first step (CAKLD's gamma); most need none."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict() returned (saved in checkpoints)."""

    def describe(self) -> dict[str, Any]:
        return {"loss": self.name, "loss_reduction": self.reduction, **({"loss_scale": self.scale} if self.scale != 1 else {}),
                **({"hidden_mse": self.hidden_mse} if self.hidden_mse else {})}


class ForwardKL(Loss):
    name = "forward_kl"

    def main(self, student_out, teacher_out, batch):
        return {"loss": forward_kl(student_out.logits, teacher_out.logits, batch.get("attention_mask"),
                                   chunk_size=self.chunk_size)}


class ReverseKL(Loss):
    name = "reverse_kl"

    def main(self, student_out, teacher_out, batch):
        return {"loss": reverse_kl(student_out.logits, teacher_out.logits, batch.get("attention_mask"),
                                   chunk_size=self.chunk_size)}


class JSD(Loss):
    name = "jsd"

    def __init__(self, *, beta: float = 0.5, **options: Any) -> None:
        super().__init__(**options)
        require(isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0,
                f"loss.beta={beta!r} must lie in [0, 1] (0.5 = symmetric JSD)")
        self.beta = float(beta)

    def main(self, student_out, teacher_out, batch):
        return {"loss": jsd(student_out.logits, teacher_out.logits, batch.get("attention_mask"), beta=self.beta,
                            chunk_size=self.chunk_size)}

    def describe(self):
        return {**super().describe(), "jsd_beta": self.beta}


class CAKLD(Loss):
    """BitDistiller's confidence-aware KL, gamma KL(S||T) + (1 - gamma) KL(T||S), gamma the teacher's confidence.

    gamma=prepass (the reference, BitDistiller train.py): before training, the teacher runs on the first
        gamma_batches + 1 training batches; gamma = (sum over those batches of the batch's mean top-1
        probability over every position) / gamma_batches (the reference's loop `if step > cakld_steps: break`
        takes one batch more than it divides by), all-reduced (mean) across ranks, then fixed.
    gamma=running (qatlab's alternative): measured on the first gamma_batches training batches themselves,
        the running token-weighted mean so far used while measuring, then fixed.
    State (checkpointed): gamma, or the running sums.
    """

    name = "cakld"

    def __init__(self, *, gamma_batches: int = 10, gamma: str = "prepass", **options: Any) -> None:
        super().__init__(**options)
        require(isinstance(gamma_batches, int) and not isinstance(gamma_batches, bool) and gamma_batches >= 1,
                f"loss.gamma_batches={gamma_batches!r} must be an integer >= 1 (e.g. 10)")
        require(gamma in GAMMA_MODES, f"loss.gamma={gamma!r} is not known; use one of {list(GAMMA_MODES)}")
        self.gamma_batches, self.gamma_mode = gamma_batches, gamma
        self._top1_sum, self._top1_count, self._gamma_steps = 0.0, 0, 0
        self._prepass_gamma: float | None = None

    @property
    def gamma(self) -> float | None:
        """The gamma in use; None before it is measured."""
        if self.gamma_mode == "prepass":
            return self._prepass_gamma
        return self._top1_sum / self._top1_count if self._top1_count else None

    @property
    def gamma_fixed(self) -> bool:
        return self._prepass_gamma is not None if self.gamma_mode == "prepass" else self._gamma_steps >= self.gamma_batches

    @torch.no_grad()
    def prepare(self, teacher: torch.nn.Module | None, batches: Iterable[Mapping[str, Tensor]]) -> None:
        if self.gamma_mode != "prepass" or self._prepass_gamma is not None:
            return
        from qatlab.data.logit_cache import cached_teacher_output

        total, seen = 0.0, 0
        for batch in batches:
            if seen > self.gamma_batches:
                break
            cached = cached_teacher_output(batch)
            if cached is not None:  # the cache keeps log-probs sorted: the first is the top-1
                top1 = cached.logits.logprobs[..., 0].float().exp()
            else:
                device = next(teacher.parameters()).device
                logits = teacher(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch.get("attention_mask", None)).logits
                top1 = torch.stack([torch.softmax(row.float(), -1).amax(-1) for row in logits])  # (B, T)
            total += top1.mean().item()  # every position, padding included, as the reference's prob1.mean()
            seen += 1
        require(seen > 0, "loss=cakld with gamma=prepass got no training batches to measure gamma on")
        gamma = torch.tensor(total / self.gamma_batches, dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(gamma)
            gamma /= dist.get_world_size()
        self._prepass_gamma = float(gamma)
        log.info("cakld: gamma %.4f from a pre-pass over %d batches (divided by %d, as the reference)",
                 self._prepass_gamma, seen, self.gamma_batches)

    def _running_gamma(self, teacher_logits: Any, mask: Tensor | None) -> float:
        """Fold this batch into gamma while still measuring; return the gamma to use now."""
        if not self.gamma_fixed:
            total, count = top1_probability_sum(teacher_logits, mask, self.chunk_size)
            stats = torch.stack([total.double(), torch.tensor(float(count), dtype=torch.float64, device=total.device)])
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(stats)
            self._top1_sum += stats[0].item()
            self._top1_count += int(stats[1].item())
            self._gamma_steps += 1
            if self.gamma_fixed:
                log.info("cakld: gamma fixed at %.4f after %d batches", self.gamma, self._gamma_steps)
        return self.gamma

    def main(self, student_out, teacher_out, batch):
        mask = batch.get("attention_mask")
        if self.gamma_mode == "prepass":
            require(self._prepass_gamma is not None, "loss=cakld (gamma=prepass) was called before prepare() measured "
                                                     "gamma; the whole-model stage runs it before training")
            gamma = self._prepass_gamma
        else:
            gamma = self._running_gamma(teacher_out.logits, mask)
        value = cakld(student_out.logits, teacher_out.logits, mask, gamma=gamma, chunk_size=self.chunk_size)
        return {"loss": value, "cakld_gamma": torch.tensor(gamma)}

    def state_dict(self):
        return {"top1_sum": self._top1_sum, "top1_count": self._top1_count, "gamma_steps": self._gamma_steps,
                "prepass_gamma": self._prepass_gamma}

    def load_state_dict(self, state):
        if state:
            self._top1_sum = float(state["top1_sum"])
            self._top1_count = int(state["top1_count"])
            self._gamma_steps = int(state["gamma_steps"])
            self._prepass_gamma = state.get("prepass_gamma", self._prepass_gamma)

    def describe(self):
        facts = {**super().describe(), "gamma_batches": self.gamma_batches, "gamma_mode": self.gamma_mode}
        if self.gamma is not None:
            facts["cakld_gamma"] = round(self.gamma, 6)
        return facts


class CrossEntropy(Loss):
    """Next-token cross-entropy of the student on the training tokens (mean over predicted tokens)."""

    name = "ce"

    @property
    def needs_teacher(self) -> bool:  # only the hidden-state term would read it
        return self.hidden_mse > 0

    def main(self, student_out, teacher_out, batch):
        logits = student_out.logits[:, :-1]
        labels = batch["input_ids"][:, 1:]
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return {"loss": loss}


class HiddenMSE(Loss):
    """Only OneBit's normalized hidden-state term (weight `hidden_mse`, default 1)."""

    name = "hidden_mse_only"
    needs_logits = False

    def __init__(self, *, hidden_mse: float = 1.0, **options: Any) -> None:
        super().__init__(hidden_mse=hidden_mse, **options)
        require(self.hidden_mse > 0, "loss=hidden_mse needs loss.hidden_mse > 0 (it is the only term)")

    def main(self, student_out, teacher_out, batch):
        return {"loss": torch.zeros((), device=student_out.hidden_states[-1].device)}


class BlockMSE(Loss):
    """Sum over decoder blocks of the mean squared error between the raw block outputs (counted tokens only)."""

    name = "block_mse"
    needs_logits = False

    @property
    def needs_hidden_states(self) -> bool:
        return True

    def main(self, student_out, teacher_out, batch):
        mask = batch.get("attention_mask")
        keep = None if mask is None else mask.reshape(-1).bool()
        terms = []
        for s, t in zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:]):
            s, t = s.float().reshape(-1, s.shape[-1]), t.detach().float().reshape(-1, t.shape[-1])
            if keep is not None:
                s, t = s[keep], t[keep]
            terms.append(F.mse_loss(s, t))
        return {"loss": torch.stack(terms).sum()}
