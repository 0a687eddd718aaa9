"""BitDistiller (Du et al. 2024): asymmetric clipping init + self-distillation with CAKLD.

- Quantizer: asymmetric MinMax per group, recomputed from the latent weight on every forward,
  STE rounding; int grid (the reference's 2-bit) or normal-float grid (its 3-bit): `weight.grid`.
- init: asymmetric clipping search on teacher activations (qatlab.quant.clip_search), cached.
- loss: CAKLD = gamma * KL(S||T) + (1 - gamma) * KL(T||S) with gamma = the teacher's mean top-1
  probability over the first `gamma_batches` training batches, then fixed; or forward_kl /
  reverse_kl / jsd.

gamma state: `state_dict()` / `load_state_dict()` on this object hold it (a plain dict of floats).
While gamma is being measured, each step's loss uses the running mean so far; per-step sums are
all-reduced across ranks when torch.distributed is initialized, so every rank uses the same gamma.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qatlab.errors import require
from qatlab.losses import cakld, forward_kl, jsd, reverse_kl, top1_probability_sum
from qatlab.methods.base import QuantMethod
from qatlab.methods.registry import register_method
from qatlab.quant import FakeQuantLinear
from qatlab.quant.clip_search import ClipConfig, ClipReport, asymmetric_clip_init, describe_report

log = logging.getLogger("qatlab")

LOSSES = ("cakld", "forward_kl", "reverse_kl", "jsd")


@register_method("bitdistiller")
class BitDistiller(QuantMethod):
    def __init__(
        self,
        *,
        loss: str = "cakld",
        gamma_batches: int = 10,
        jsd_beta: float = 0.5,
        chunk_size: int = 1024,
        clip: Mapping[str, Any] | None = None,
        train: bool = True,
        gradient_checkpointing: bool = False,
        **quant: Any,
    ):
        super().__init__(**quant)
        require(loss in LOSSES, f"method.loss='{loss}' is not known; choose one of {list(LOSSES)}")
        require(
            isinstance(gamma_batches, int) and gamma_batches >= 1,
            f"method.gamma_batches={gamma_batches!r} must be an integer >= 1 (e.g. 10)",
        )
        require(0.0 <= jsd_beta <= 1.0, f"method.jsd_beta={jsd_beta} must lie in [0, 1] (0.5 = symmetric JSD)")
        self.loss_name = loss
        self.gamma_batches = gamma_batches
        self.jsd_beta = jsd_beta
        self.chunk_size = chunk_size
        self.clip = ClipConfig.from_dict(clip)
        self.trains = train  # false: clip init only, then evaluate (no optimizer, no fit)
        self.gradient_checkpointing = gradient_checkpointing
        self.clip_report: ClipReport | None = None
        self._top1_sum, self._top1_count, self._gamma_steps = 0.0, 0, 0

    # -- the interface -------------------------------------------------------------------
    def convert(self, student: nn.Module) -> list[str]:
        layers = super().convert(student)
        if self.gradient_checkpointing:
            student.config.use_cache = False
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return layers

    def init(self, student: nn.Module, teacher: nn.Module, calibration: Iterable[dict]) -> None:
        """Asymmetric clipping search (or its cached result) on the student's latent weights."""
        if not self.clip.enabled or self.weight_config is None:
            return
        layers = {n: student.get_submodule(n) for n in self.quantized_layers}
        layers = {n: m for n, m in layers.items() if isinstance(m, FakeQuantLinear) and m.weight_cfg is not None}
        self.clip_report = asymmetric_clip_init(student, teacher, layers, calibration, self.clip)

    def loss(self, student_out: Any, teacher_out: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mask = batch.get("attention_mask")
        s, t = student_out.logits, teacher_out.logits
        extra: dict[str, Tensor] = {}
        if self.loss_name == "cakld":
            gamma = self._gamma(t, mask)
            value = cakld(s, t, mask, gamma=gamma, chunk_size=self.chunk_size)
            extra["cakld_gamma"] = torch.tensor(gamma)
        elif self.loss_name == "jsd":
            value = jsd(s, t, mask, beta=self.jsd_beta, chunk_size=self.chunk_size)
        else:
            value = {"forward_kl": forward_kl, "reverse_kl": reverse_kl}[self.loss_name](
                s, t, mask, chunk_size=self.chunk_size
            )
        return {"loss": value, self.loss_name: value.detach(), **extra}

    # -- CAKLD's gamma ---------------------------------------------------------------------
    @property
    def gamma(self) -> float | None:
        """The teacher's mean top-1 probability so far; None before the first batch."""
        return self._top1_sum / self._top1_count if self._top1_count else None

    @property
    def gamma_fixed(self) -> bool:
        return self._gamma_steps >= self.gamma_batches

    def _gamma(self, teacher_logits: Tensor, mask: Tensor | None) -> float:
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

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to keep the same gamma."""
        return {"top1_sum": self._top1_sum, "top1_count": self._top1_count, "gamma_steps": self._gamma_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._top1_sum = float(state["top1_sum"])
        self._top1_count = int(state["top1_count"])
        self._gamma_steps = int(state["gamma_steps"])

    # -- reporting ---------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        facts = {**super().describe(), "loss": self.loss_name}
        if self.weight_config is not None:
            facts["w_grid"] = self.weight_config.grid
        if self.clip_report is not None:
            facts.update(describe_report(self.clip_report))
        return facts
