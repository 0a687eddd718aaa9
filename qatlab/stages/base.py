"""Stage: one training phase of a recipe (conf/stage/*.yaml), run in order by the recipe.

    whole_model  one Lightning fit of the whole student on the recipe's loss (KD, CAKLD, CE, ...)
    blockwise    decoder block by block, MSE to the teacher block (ZeroQuant's LKD, EfficientQAT's Block-AP)
A recipe may chain them (EfficientQAT: Block-AP, then end-to-end training of the quantizer
parameters). `stage.run(ctx)` trains ctx.student in place and returns metrics for the results row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from torch import nn


@dataclass
class StageContext:
    cfg: DictConfig  # the run's whole config (trainer, optimizer, scheduler, data, teacher_cache, ...)
    recipe: Any  # qatlab.recipes.Recipe
    student: nn.Module
    teacher: nn.Module
    tokenizer: Any
    datamodule: L.LightningDataModule
    trainer: L.Trainer  # the run's Lightning trainer (loggers, callbacks); whole-model stages fit with it
    output_dir: Path
    resume: Any = None  # qatlab.checkpointing.ResumeFrom | None
    resume_state: Any = None  # qatlab.callbacks.resume_state.ResumeState (whole-model resume)
    guard: Any = None  # qatlab.callbacks.nonfinite_guard.NonFiniteGuard


class Stage:
    name = "stage"  # the key under `stages:` (build_recipe sets it)
    enabled = True

    def run(self, ctx: StageContext) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}
