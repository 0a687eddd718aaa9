"""last.ckpt that survives what ends runs early: a timer, SIGINT/SIGTERM, and a save when training ends.

The model_checkpoint callback saves every N steps; a run shorter than N (the default run: 40 steps,
N = 200) used to lose all its training to a kill. SafeCheckpoint writes <output_dir>/checkpoints/last.ckpt,
what resume=auto continues from (conf `checkpoint:`):

- every `checkpoint.every_minutes` of training (checked at batch end; default 5);
- when training ends (`at_end`), so a run killed in evaluation, export or results writing resumes
  without training again;
- on SIGINT / SIGTERM (`on_signal`; SLURM sends SIGTERM before preemption): at the end of the step in
  flight, then the run stops with one line that says how to resume (exit code 128 + signal: 130, 143).

The signal handlers are installed for the whole run (`interrupts()` around train()): a signal outside
training (data generation, clip search, evaluation) stops the run at once with the same advice; what
those phases finished is already on disk (whole shards and caches, last.ckpt). A second signal stops
at once. Every save comes after NonFiniteGuard checked that step's weights, so none holds inf/NaN.
With several processes the ranks decide together (one all-reduce per batch): the collective save
never deadlocks. trainer.enable_checkpointing=false turns the saves off (signals still stop cleanly).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qatlab.errors import Interrupted, require

log = logging.getLogger("qatlab")

LAST = "last.ckpt"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class _RunState:
    """What a signal handler needs to know about the run in this process."""

    signum: int | None = None  # the first signal received
    callback: SafeCheckpoint | None = None  # the current (or last) fit's
    phase: str = "before"  # before -> training -> after (training ended)
    fitting: bool = False  # a fit is running: a first signal is answered at the next batch end
    command: list[str] = field(default_factory=list)  # how to resume, for the message
    output_dir: str = ""


_STATE = _RunState()


class SafeCheckpoint(L.Callback):
    def __init__(self, dirpath: str | Path, every_minutes: float | None = 5.0, at_end: bool = True,
                 on_signal: bool = True, enabled: bool = True):
        require(every_minutes is None or (isinstance(every_minutes, (int, float)) and not isinstance(every_minutes, bool)
                                          and 0 < every_minutes < float("inf")),
                f"checkpoint.every_minutes={every_minutes!r} must be a number of minutes > 0, or null for no timed saves")
        self.path = Path(dirpath) / LAST
        self.every_s = None if every_minutes is None else float(every_minutes) * 60
        self.at_end, self.on_signal, self.enabled = bool(at_end), bool(on_signal), bool(enabled)
        self.last: tuple[Path, int] | None = None  # (file, step) of the last good weights this run knows of
        self._since = time.monotonic()

    # ---- hooks -------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _STATE.callback, _STATE.phase, _STATE.fitting = self, "training", True
        self._since = time.monotonic()
        if trainer.ckpt_path:
            self.last = (Path(trainer.ckpt_path), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        signalled = _STATE.signum is not None
        due = self.every_s is not None and time.monotonic() - self._since >= self.every_s
        if not trainer.strategy.reduce_boolean_decision(signalled or due, all=False):
            return
        stop = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        if self.enabled and (due or self.on_signal):
            self.save(trainer)
        if stop:
            signum = _STATE.signum or signal.SIGTERM
            raise Interrupted(interrupted_message(signum, trainer.global_step), signum)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved_now = self.last is not None and self.last[1] == trainer.global_step
        if self.enabled and self.at_end and not saved_now and not _model_checkpoint_covers(trainer, self.path):
            self.save(trainer)
        _STATE.phase, _STATE.fitting = "after", False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Lightning's own SIGTERM handling stops validation with SIGTERMException: save before it leaves."""
        if (isinstance(exception, SIGTERMException) and _STATE.signum is not None and self.enabled and self.on_signal
                and trainer.global_step > (self.last[1] if self.last else 0)):
            self.save(trainer)
        _STATE.fitting = False

    # ---- saving ------------------------------------------------------------------------------------

    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)  # atomic (AtomicCheckpointIO), collective on several ranks
        self.last, self._since = (self.path, trainer.global_step), time.monotonic()
        for callback in trainer.checkpoint_callbacks:  # so its save_last overwrites this file, never last-v1.ckpt
            if isinstance(callback, ModelCheckpoint) and not callback.last_model_path and callback.dirpath \
                    and Path(callback.dirpath).resolve() == self.path.parent.resolve():
                callback.last_model_path = str(self.path)
        log.info("checkpoint: saved %s (step %d)", self.path, trainer.global_step)


def _model_checkpoint_covers(trainer: L.Trainer, path: Path) -> bool:
    """True when a ModelCheckpoint writing this last.ckpt saved at this step or will save it in its on_train_end."""
    for cb in trainer.checkpoint_callbacks:
        if not (isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath
                and Path(cb.dirpath).resolve() == path.parent.resolve()):
            continue
        saved_any = bool(getattr(cb, "_last_checkpoint_saved", None))
        if not saved_any or getattr(cb, "_last_global_step_saved", -1) == trainer.global_step:
            return True
    return False


def last_saved(trainer: L.Trainer) -> tuple[Path, int] | None:
    """(file, step) of the newest checkpoint this run wrote or resumed from; None if there is none."""
    found = []
    for cb in trainer.callbacks:
        if isinstance(cb, SafeCheckpoint) and cb.last is not None:
            found.append(cb.last)
        elif isinstance(cb, ModelCheckpoint) and getattr(cb, "_last_checkpoint_saved", None):
            found.append((Path(cb._last_checkpoint_saved), int(cb._last_global_step_saved)))
    if trainer.ckpt_path and not found:
        found.append((Path(trainer.ckpt_path), -1))
    return max(found, key=lambda f: f[1]) if found else None


# ---- signals -------------------------------------------------------------------------------------


@contextlib.contextmanager
def interrupts(output_dir: str | Path, command: list[str] | None = None) -> Iterator[None]:
    """SIGINT/SIGTERM handlers for one run (main thread only); Lightning's SIGTERMException becomes Interrupted."""
    global _STATE
    previous_state, _STATE = _STATE, _RunState(command=list(command or []), output_dir=str(output_dir))
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            installed[signum] = signal.signal(signum, _handler)
    try:
        yield
    except SIGTERMException:
        signum = _STATE.signum or signal.SIGTERM
        raise Interrupted(interrupted_message(signum), signum) from None
    finally:
        for signum, handler in installed.items():
            signal.signal(signum, handler)
        _STATE = previous_state


def _handler(signum: int, frame: Any) -> None:
    first = _STATE.signum is None
    _STATE.signum = _STATE.signum or signum
    if first and _STATE.fitting:
        log.warning("%s received: saving at the end of this step, then stopping (send it again to stop at once)",
                    signal.Signals(signum).name)
        return
    raise Interrupted(interrupted_message(signum), signum)


def interrupted_message(signum: int, step: int | None = None) -> str:
    name = signal.Signals(signum).name
    callback = _STATE.callback
    where = {"before": "before training (finished cache shards and checkpoints are kept)",
             "training": "during training" + (f" at global_step {step}" if step is not None else ""),
             "after": "after training"}[_STATE.phase]
    if callback is not None and callback.last is not None:
        saved = f"{callback.last[0]} holds global_step {callback.last[1]}"
    elif callback is not None and not callback.enabled:
        saved = "nothing was saved (trainer.enable_checkpointing=false)"
    elif (Path(_STATE.output_dir) / "checkpoints" / LAST).is_file():
        saved = f"{Path(_STATE.output_dir) / 'checkpoints' / LAST} (from before) is kept"
    else:
        saved = "no checkpoint was saved yet"
    return f"interrupted by {name} {where}; {saved}. Continue with: {resume_command()}"


def resume_command() -> str:
    drop = ("resume=", "hydra.run.dir=", "paths.output_dir=")
    kept = [a for a in _STATE.command if not a.startswith(drop)]
    if not _STATE.command:  # not started from the command line
        return f"train(cfg) with paths.output_dir={_STATE.output_dir} and resume=auto"
    return " ".join(["python -m qatlab", *kept, f"hydra.run.dir={_STATE.output_dir}", "resume=auto"])
