"""QATModule: a frozen teacher, a fake-quant student, and the loss that scores them (Lightning)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from qatlab.data.logit_cache import cached_teacher_output
from qatlab.errors import QatlabError
from qatlab.eval.perplexity import TokenPerplexity
from qatlab.losses.objectives import Loss

# The frozen teacher is in eval mode on purpose; Lightning warns about any module that is.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def freeze(model: nn.Module) -> nn.Module:
    """Teacher mode: eval, no grad, never an optimizer's business."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class QATModule(L.LightningModule):
    """Training step = teacher forward (no grad, only if the loss reads it) + student forward -> loss -> dict.

    param_groups(student) -> optimizer groups (qatlab.stages.params), asked in configure_optimizers, i.e.
    after a sharding strategy wrapped the student. state: an object with state_dict/load_state_dict
    (the recipe: the loss's running state, e.g. CAKLD's gamma) saved in every checkpoint.
    """

    def __init__(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        loss: Loss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None,
        state: Any = None,
    ):
        super().__init__()
        # None with teacher_cache on, or for a loss that needs no teacher (ce).
        self.teacher = freeze(teacher) if teacher is not None else None
        self.student = student
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.param_groups = param_groups or (lambda model: [{"params": [p for p in model.parameters() if p.requires_grad]}])
        self.state = state
        self.val_ppl = TokenPerplexity()
        # Checkpoints hold the student only; the teacher is rebuilt from its config.
        self.strict_loading = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # Lightning calls .train() on the whole module; the teacher stays eval
        return self

    def forward(self, batch: dict[str, Tensor], **kwargs: Any) -> Any:
        return self.student(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **kwargs)

    def teacher_outputs(self, batch: dict[str, Tensor], hidden: dict[str, Any]) -> Any:
        """The teacher's output: read from the batch (teacher_cache: top-k logits), else a no-grad forward."""
        if not self.loss.needs_teacher:
            return None
        cached = cached_teacher_output(batch)
        if cached is not None:
            if hidden:
                raise QatlabError(f"loss '{self.loss.name}' needs the teacher's hidden states, which the teacher "
                                  "cache does not hold; set teacher_cache.enabled=false")
            return cached
        if self.teacher is None:
            raise QatlabError("QATModule has no teacher and the batch carries no cached teacher top-k; "
                              "pass the teacher or turn teacher_cache.enabled on")
        with torch.no_grad():
            return self.teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **hidden)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        hidden = {"output_hidden_states": True} if self.loss.needs_hidden_states else {}
        teacher_out = self.teacher_outputs(batch, hidden)
        student_out = self(batch, **hidden)
        losses = self.loss(student_out, teacher_out, batch)
        loss = losses["loss"]  # a non-finite one is skipped and counted by NonFiniteGuard (qatlab/callbacks)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.val_ppl.update(self(batch).logits, batch["input_ids"])
        self.log("val/ppl", self.val_ppl, prog_bar=True, batch_size=len(batch["input_ids"]))

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.param_groups(self.student))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        if self.state is not None:
            checkpoint["qatlab_recipe"] = self.state.state_dict()  # e.g. CAKLD's gamma

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.state is not None:
            self.state.load_state_dict(checkpoint.get("qatlab_recipe", {}))
