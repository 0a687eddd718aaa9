"""Skip optimizer steps whose loss or gradients are not finite; stop after too many in a row, or when a
step leaves non-finite weights.

A bad step leaves the weights and the optimizer state as they were (its gradients are dropped before
the optimizer sees them; AdamW skips parameters without a gradient), is counted (`train/bad_steps`)
and logged as a warning. `max_bad_steps` bad steps in a row raise a QatlabError: training stops
before that step's checkpoint is written, so the last checkpoint on disk holds good weights.

A step with finite gradients can still write inf/NaN weights (a huge learning rate, an overflow inside
the optimizer). After every step the guard checks the trained parameters, at batch end, before any
checkpoint callback runs (Lightning runs those last): non-finite weights stop the run at once, so no
checkpoint ever holds them, and the message names the last checkpoint and its step.

Why drop the gradients instead of returning None from training_step: the decision is made once per
optimizer step, after gradient accumulation and (under DDP) after the all-reduce, so every rank sees
the same NaN gradients and skips together. With fp16 a GradScaler also skips overflow steps; the
guard counts those too (they were not applied), so a long run of them stops the run.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from qatlab.errors import QatlabError, require

log = logging.getLogger("qatlab")


class NonFiniteGuard(L.Callback):
    def __init__(self, max_bad_steps: int = 10):
        require(
            isinstance(max_bad_steps, int) and not isinstance(max_bad_steps, bool) and max_bad_steps >= 1,
            f"guard.max_bad_steps={max_bad_steps!r} must be an integer >= 1 (e.g. 10)",
        )
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0  # in the whole run
        self.bad_in_a_row = 0
        self._loss_finite = True  # over the micro-batches of the current optimizer step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            self._loss_finite = False

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        good = self._loss_finite and grads_finite(optimizer)
        self._loss_finite = True
        if good:
            self.bad_in_a_row = 0
        else:
            optimizer.zero_grad(set_to_none=True)  # this step changes nothing
            self.bad_steps += 1
            self.bad_in_a_row += 1
            log.warning("non-finite loss or gradient at step %d: step skipped (%d bad steps, %d in a row)",
                        trainer.global_step, self.bad_steps, self.bad_in_a_row)
        pl_module.log("train/bad_steps", float(self.bad_steps), on_step=True, on_epoch=False)
        if self.bad_in_a_row >= self.max_bad_steps:
            raise QatlabError(
                f"{self.bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(up to step {trainer.global_step}; guard.max_bad_steps={self.max_bad_steps}); the run stopped: "
                f"{last_checkpoint(trainer)}. Lower optimizer.lr, use trainer.precision=bf16-mixed "
                "instead of 16-mixed, or raise guard.max_bad_steps; then resume=auto (optimizer.lr and guard.* may "
                "change on resume)"
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """After the optimizer step: the weights it wrote must be finite (every rank agrees before raising)."""
        bad = nonfinite_parameters(trainer.optimizers, pl_module)
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            return
        raise QatlabError(
            f"the optimizer step at global_step {trainer.global_step - 1} left non-finite weights in the student "
            f"({', '.join(bad[:3]) or 'on another rank'}"
            f"{' ...' if len(bad) > 3 else ''}) although its loss and gradients were finite: the optimizer step "
            f"overflowed (optimizer.lr too large?). The run stopped before saving them: {last_checkpoint(trainer)}. "
            "Lower optimizer.lr, then resume=auto (optimizer.lr may change on resume)"
        )

    def state_dict(self) -> dict[str, int]:
        return {"bad_steps": self.bad_steps, "bad_in_a_row": self.bad_in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.bad_steps = int(state["bad_steps"])
        self.bad_in_a_row = int(state["bad_in_a_row"])


def nonfinite_parameters(optimizers: list[Any], module: torch.nn.Module | None = None) -> list[str]:
    """Names of the trained parameters that hold inf/NaN (empty: all finite; one device sync)."""
    names = {id(p): n for n, p in module.named_parameters()} if module is not None else {}
    params = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
    local = [(names.get(id(p), f"parameter {i}"), _local(p)) for i, p in enumerate(params)]
    local = [(name, t) for name, t in local if t.numel()]
    if not local:
        return []
    device = local[0][1].device
    finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in local])
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(local, finite.tolist()) if not ok]


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (FSDP2's DTensor); the tensor itself otherwise."""
    p = p.detach()
    return p.to_local() if hasattr(p, "to_local") else p


def last_checkpoint(trainer: L.Trainer) -> str:
    """Where the last good weights are, for a stop message."""
    from qatlab.callbacks.safe_checkpoint import last_saved

    saved = last_saved(trainer)
    if saved is None:
        return "no checkpoint was written in this run yet"
    path, step = saved
    if step < 0:
        return f"{path} (the checkpoint this run resumed from) holds the last good weights"
    return f"{path} holds the last good weights (global_step {step})"


def grads_finite(optimizer: Any) -> bool:
    """True when every gradient the optimizer would apply is finite (one device sync, not one per tensor)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    device = grads[0].device
    return bool(torch.stack([torch.isfinite(g).all().to(device) for g in grads]).all())
