"""KD: generic QAT. An STE fake-quant student distilled from the teacher's logits."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from qatlab.errors import require
from qatlab.losses import forward_kl
from qatlab.methods.base import QuantMethod
from qatlab.methods.registry import register_method

LOGIT_LOSSES = {"forward_kl": forward_kl}


@register_method("kd")
class KD(QuantMethod):
    """Student starts as the RTN model and minimizes KL(teacher || student) per token."""

    def __init__(self, *, loss: str = "forward_kl", chunk_size: int = 1024, **quant: Any):
        super().__init__(**quant)
        require(
            loss in LOGIT_LOSSES,
            f"method.loss='{loss}' is not known; choose one of {sorted(LOGIT_LOSSES)}",
        )
        self.loss_name = loss
        self.chunk_size = chunk_size

    def loss(self, student_out: Any, teacher_out: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mask = batch.get("attention_mask")
        kl = LOGIT_LOSSES[self.loss_name](
            student_out.logits, teacher_out.logits, mask, chunk_size=self.chunk_size
        )
        return {"loss": kl, self.loss_name: kl.detach()}
