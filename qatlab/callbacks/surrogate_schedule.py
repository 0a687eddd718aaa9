"""SurrogateSchedule: sharpen OneBit's tanh sign surrogate over training.

The backward of sign(W) is grad * (1.001 - tanh(k W)^2). k = 1 (the reference) leaves the gradient
almost straight-through for latent weights near 0.01; raising k narrows the band of weights that
still get a full gradient, so signs settle towards the end of training. k moves geometrically
from `start` to `end` over trainer.max_steps and is written into every OneBitLinear.sharpness.
Enable it with:
  +callbacks.surrogate_schedule._target_=qatlab.callbacks.surrogate_schedule.SurrogateSchedule
  +callbacks.surrogate_schedule.end=100
"""

from __future__ import annotations

import lightning as L

from qatlab.errors import require
from qatlab.layers.onebit_linear import OneBitLinear


def sharpness_at(step: int, total: int, start: float, end: float) -> float:
    """Geometric interpolation start -> end over total steps (end at step >= total)."""
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    return start * (end / start) ** frac


class SurrogateSchedule(L.Callback):
    def __init__(self, start: float = 1.0, end: float = 100.0):
        require(start > 0 and end > 0, f"surrogate schedule start={start}, end={end} must both be > 0")
        self.start, self.end = float(start), float(end)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        k = sharpness_at(trainer.global_step, trainer.max_steps, self.start, self.end)
        for module in pl_module.modules():
            if isinstance(module, OneBitLinear):
                module.sharpness = k
        pl_module.log("train/surrogate_sharpness", k)
