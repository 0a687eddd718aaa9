"""QATModule: a frozen teacher, a fake-quant student, and a method plugin that scores them."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from qatlab.errors import QatlabError
from qatlab.eval.perplexity import TokenPerplexity
from qatlab.methods.base import QuantMethod


# The frozen teacher is in eval mode on purpose; Lightning warns about any module that is.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def freeze(model: nn.Module) -> nn.Module:
    """Teacher mode: eval, no grad, never an optimizer's business."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class QATModule(L.LightningModule):
    """Training step = teacher forward (no grad) + student forward -> method.loss -> dict."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        method: QuantMethod,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
    ):
        super().__init__()
        self.teacher = freeze(teacher)
        self.student = student
        self.method = method
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_ppl = TokenPerplexity()
        # Checkpoints hold the student only; the teacher is rebuilt from its config.
        self.strict_loading = False

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # Lightning calls .train() on the whole module; the teacher stays eval
        return self

    def forward(self, batch: dict[str, Tensor], **kwargs: Any) -> Any:
        return self.student(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **kwargs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        hidden = {"output_hidden_states": True} if self.method.needs_hidden_states else {}
        with torch.no_grad():
            teacher_out = self.teacher(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **hidden
            )
        student_out = self(batch, **hidden)
        losses = self.method.loss(student_out, teacher_out, batch)
        loss = losses["loss"]
        if not math.isfinite(loss.item()):
            raise QatlabError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; "
                "lower the learning rate, use bf16 instead of fp16, or resume from the last checkpoint"
            )
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.val_ppl.update(self(batch).logits, batch["input_ids"])
        self.log("val/ppl", self.val_ppl, prog_bar=True, batch_size=len(batch["input_ids"]))

    def configure_optimizers(self) -> Any:
        params = self.method.trainable_parameters(self.student)
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
