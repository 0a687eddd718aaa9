"""What a Lightning checkpoint lacks for a bit-identical resume: the data position, the RNG states, the config.

Lightning restores the weights, the optimizer, the scheduler and its loop counters, but a plain
DataLoader restarts its epoch from the first batch and a fresh seeded generator. ReplayLoader wraps
the train loader; after a restore its next pass replays the loader to where the checkpoint was
(whole earlier epochs too, so the shuffle generator advances exactly as it did), then yields from
there. Replaying costs one pass over in-memory token blocks per past epoch: no model work.

The position is counted here, in training batches finished, because the loader itself runs one
batch ahead of training (Lightning prefetches the next batch to know which one is the last).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch

from qatlab.errors import QatlabError


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
    def __init__(self, config_hash: str, loader: ReplayLoader | None = None):
        self.config_hash = config_hash
        self.loader = loader
        self.batches_seen = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.batches_seen += 1  # runs before ModelCheckpoint's hook (Lightning runs checkpoint callbacks last)

    def state_dict(self) -> dict[str, Any]:
        return {"config_hash": self.config_hash, "batches_seen": self.batches_seen, "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config_hash"] != self.config_hash:
            raise QatlabError(
                f"resume: the checkpoint was written by another config (hash {state['config_hash']}, this run "
                f"{self.config_hash}); resume with the overrides it was started with, or set resume=null"
            )
        self.batches_seen = int(state["batches_seen"])
        if self.loader is not None:
            self.loader.start_at(self.batches_seen)
        set_rng_state(state["rng"])


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
