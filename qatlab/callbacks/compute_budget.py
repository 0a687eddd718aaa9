"""A compute budget for comparing recipes at equal cost: CPU time, PPL along the way, a stop at the end.

    budget.cpu_minutes=20 budget.points=[2.5,5,10,20]

The clock is the process's CPU time (user + system, all threads: qatlab.callbacks.compute_budget.CPUClock),
so a budget means the same compute on a shared machine whatever else runs beside it (on the idle 2-core
machine one CPU-minute is about 30 wall-seconds). It starts before the recipe's init and runs through
every stage (clip search, GPTQ, SVID, block-wise training and the whole-model fit all count); the
teacher's and RTN's evaluation and the scoring at the points below are paused out of it.

At each point (CPU-minutes) the student is scored with the run's pinned test PPL and a row
{cpu_minutes, steps, tokens, ppl} is added to the run's `curve`; when the budget is spent the
whole-model fit stops (a last point is always recorded at the end of training).

budget.schedule=cosine decays the learning rate over the budget instead of over trainer.max_steps (a
budget run does not know its step count in advance): lr = base x (1 + cos(pi x used / budget)) / 2,
set before every step; it needs scheduler=constant so nothing else sets the lr.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import lightning as L

from qatlab.errors import require

log = logging.getLogger("qatlab")


class CPUClock:
    """CPU seconds used by this process since start(), minus paused intervals."""

    def __init__(self) -> None:
        self.started = time.process_time()
        self.paused_total = 0.0
        self._paused_at: float | None = None

    def used(self) -> float:
        now = self._paused_at if self._paused_at is not None else time.process_time()
        return now - self.started - self.paused_total

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = time.process_time()

    def resume(self) -> None:
        if self._paused_at is not None:
            self.paused_total += time.process_time() - self._paused_at
            self._paused_at = None


SCHEDULES = (None, "cosine")


def check_budget(budget: Any, scheduler: Any = None) -> tuple[float | None, list[float]]:
    """(budget in CPU-minutes or None, sorted points) from the `budget` config group, validated."""
    budget = budget or {}
    minutes, points = budget.get("cpu_minutes"), list(budget.get("points") or [])
    schedule = budget.get("schedule")
    require(schedule in SCHEDULES, f"budget.schedule={schedule!r} is not known; use cosine or null")
    require(schedule is None or minutes is not None, "budget.schedule=cosine needs budget.cpu_minutes")
    require(schedule is None or scheduler is None or "constant" in str(scheduler.get("_target_", "")),
            "budget.schedule=cosine sets the lr itself: add scheduler=constant (the cosine scheduler counts steps)")
    require(minutes is None or (isinstance(minutes, (int, float)) and not isinstance(minutes, bool)
                                and math.isfinite(minutes) and minutes > 0),
            f"budget.cpu_minutes={minutes!r} must be a positive number of CPU-minutes, or null for no budget")
    require(all(isinstance(p, (int, float)) and p > 0 for p in points),
            f"budget.points={points!r} must be positive CPU-minutes (e.g. [2.5, 5, 10, 20])")
    require(minutes is not None or not points, "budget.points needs budget.cpu_minutes (the budget they divide)")
    return minutes, sorted(p for p in points if minutes is None or p <= minutes)


class ComputeBudget(L.Callback):
    def __init__(self, clock: CPUClock, cpu_minutes: float | None, points: list[float],
                 score: Callable[[], float], tokens_per_step: int, schedule: str | None = None) -> None:
        self.clock, self.minutes, self.points = clock, cpu_minutes, list(points)
        self.score, self.tokens_per_step, self.schedule = score, tokens_per_step, schedule
        self.curve: list[dict[str, Any]] = []
        self._base_lrs: list[float] | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.schedule != "cosine":
            return
        groups = [g for opt in trainer.optimizers for g in opt.param_groups]
        if self._base_lrs is None:
            self._base_lrs = [g["lr"] for g in groups]
        progress = min(1.0, self.clock.used() / 60 / self.minutes)
        for group, base in zip(groups, self._base_lrs):
            group["lr"] = base * 0.5 * (1 + math.cos(math.pi * progress))

    def record(self, steps: int) -> None:
        self.clock.pause()
        try:
            ppl = self.score()
        finally:
            self.clock.resume()
        point = {"cpu_minutes": round(self.clock.used() / 60, 3), "steps": steps,
                 "tokens": steps * self.tokens_per_step, "ppl": ppl}
        self.curve.append(point)
        log.info("budget: %.2f CPU-minutes, %d steps, test PPL %.2f", point["cpu_minutes"], steps, ppl)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        used = self.clock.used() / 60
        if self.points and used >= self.points[0]:
            while self.points and used >= self.points[0]:
                self.points.pop(0)
            self.record(trainer.global_step)
        if self.minutes is not None and used >= self.minutes:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not self.curve or self.curve[-1]["steps"] != trainer.global_step:
            self.record(trainer.global_step)
