"""Callbacks the reliability tests add through the config (`+callbacks.probe._target_=probes.X`).

They run inside the training process (tests put tests/ on PYTHONPATH for subprocesses), so a test can
see how far a run got, or send it a signal at an exact step, without any hook in qatlab itself.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L

SEEN: list[int] = []  # in-process runs: the global step at every batch end


class StepMarker(L.Callback):
    """Writes the global step to `path` after every optimizer step (a test polls it from outside)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        SEEN.append(trainer.global_step)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(trainer.global_step))
        os.replace(tmp, self.path)


class SignalAt(L.Callback):
    """Sends this process `signum` at the end of step `step` (what a scheduler's SIGTERM would do mid-run)."""

    def __init__(self, step: int, signum: str = "SIGINT"):
        self.step, self.signum = int(step), getattr(signal, signum)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        SEEN.append(trainer.global_step)
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
