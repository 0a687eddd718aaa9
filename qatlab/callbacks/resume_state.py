"""What a Lightning checkpoint lacks for a bit-identical resume: the data position, the RNG states, the config.

Lightning restores the weights, the optimizer, the scheduler and its loop counters, but a plain
DataLoader restarts its epoch from the first batch and a fresh seeded generator. ReplayLoader wraps
the train loader; after a restore its next pass replays the loader to where the checkpoint was
(whole earlier epochs too, so the shuffle generator advances exactly as it did), then yields from
there. Replaying costs one pass over in-memory token blocks per past epoch: no model work.

The position is counted here, in training batches finished, because the loader itself runs one
batch ahead of training (Lightning prefetches the next batch to know which one is the last).

A resume may change optimizer.lr (qatlab.checkpointing.SAFE_ON_RESUME): Lightning restores the optimizer
and scheduler with the old learning rate, so on_train_start scales them by new / old, which keeps the
schedule's shape (warmup, cosine) and moves it to the new peak from the resumed step on.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch

from qatlab.errors import QatlabError

log = logging.getLogger("qatlab")


class ReplayLoader:
    """A train loader whose next pass can start at batch n of the uninterrupted run (single process)."""

    def __init__(self, loader: Iterable):
        self.loader = loader
        self._skip = 0

    def __len__(self) -> int:
        return len(self.loader)

    def start_at(self, batches_seen: int) -> None:
        self._skip = batches_seen

    def __iter__(self) -> Iterator:
        # A generator: nothing runs until the first batch is asked for (Lightning calls iter() once
        # just to check the object is iterable; that must not draw from the shuffle generator).
        skip, self._skip = self._skip, 0
        for _ in range(skip // len(self.loader)):  # finished epochs, taken as Lightning takes them:
            batches = iter(self.loader)  # len(loader) batches, never running the iterator dry (which would
            for _ in range(len(self.loader)):  # let the sampler draw one more permutation)
                next(batches)
        batches = iter(self.loader)
        for _ in range(skip % len(self.loader)):
            next(batches)
        yield from batches


class ResumeState(L.Callback):
    """config_hash: qatlab.checkpointing.resume_hash (the config without the keys a resume may change);
    also_accept: hashes of older formats that mean the same config (the full config hash); lr: optimizer.lr."""

    def __init__(self, config_hash: str, loader: ReplayLoader | None = None, also_accept: tuple[str, ...] = (),
                 lr: float | None = None):
        self.config_hash = config_hash
        self.also_accept = tuple(also_accept)
        self.loader = loader
        self.lr = lr
        self.batches_seen = 0
        self.train_loss: float | None = None  # the last step's, so a run resumed after its last step still has it
        self._lr_then: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.batches_seen += 1  # runs before ModelCheckpoint's hook (Lightning runs checkpoint callbacks last)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.train_loss = float(loss)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        then, now, self._lr_then = self._lr_then, self.lr, None
        if then is None or now is None or then == now or not then > 0:
            return
        scale_learning_rate(trainer, now / then)
        log.warning("resume: optimizer.lr %g -> %g from step %d (the schedule keeps its shape)",
                    then, now, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"config_hash": self.config_hash, "batches_seen": self.batches_seen, "rng": rng_state(),
                "lr": self.lr, "train_loss": self.train_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config_hash"] not in (self.config_hash, *self.also_accept):
            raise QatlabError(
                f"resume: the checkpoint was written by another config (hash {state['config_hash']}, this run "
                f"{self.config_hash}); resume with the overrides it was started with, or set resume=null"
            )
        self.batches_seen = int(state["batches_seen"])
        if self.loader is not None:
            self.loader.start_at(self.batches_seen)
        set_rng_state(state["rng"])
        self._lr_then = state.get("lr")
        self.train_loss = state.get("train_loss")


def scale_learning_rate(trainer: L.Trainer, factor: float) -> None:
    """Multiply every restored learning rate (the groups' current and initial lr, the schedulers' base lrs)."""
    if not math.isfinite(factor) or factor <= 0:
        raise QatlabError(f"resume: cannot scale the learning rate by {factor}; give a finite optimizer.lr > 0")
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            for key in ("lr", "initial_lr"):
                if key in group:
                    group[key] = group[key] * factor
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [lr * factor for lr in scheduler._last_lr]


def rng_state() -> dict[str, Any]:
    """Every generator a step might draw from, as tensors and plain values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
