"""WholeModel: one Lightning fit of the whole student on the recipe's loss (KD, CAKLD, CE, ...).

Options (conf/stage/whole_model.yaml; the trainer, optimizer and scheduler groups configure the fit):
  train              which parameters train (qatlab.stages.params): all | weights | qparams | weights+qparams
  qparams_lr_scale   the quantizers' parameters train at optimizer.lr x this, without weight decay
  freeze_codes       keep each learned quantizer's codes fixed from the start of this stage, so only
                     the qparams move (EfficientQAT's E2E-QP on its packed model)
  gradient_checkpointing  recompute block activations in backward (memory for compute)
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any

import hydra
import torch

from qatlab.callbacks.resume_state import ReplayLoader
from qatlab.data.logit_cache import attach_teacher_cache
from qatlab.errors import require
from qatlab.layers.fake_linear import FakeQuantLinear
from qatlab.stages.base import Stage, StageContext
from qatlab.stages.params import check_train, parameter_groups
from qatlab.stages.qat_module import QATModule


class WholeModel(Stage):
    name = "train"

    def __init__(self, *, train: str = "all", qparams_lr_scale: float = 1.0, freeze_codes: bool = False,
                 gradient_checkpointing: bool = False, enabled: bool = True) -> None:
        check_train(train, "stages.<name>.train")
        require(isinstance(qparams_lr_scale, (int, float)) and math.isfinite(qparams_lr_scale) and qparams_lr_scale > 0,
                f"stages.<name>.qparams_lr_scale={qparams_lr_scale!r} must be a number > 0 (1 = the optimizer's lr)")
        self.train, self.qparams_lr_scale = train, float(qparams_lr_scale)
        self.freeze_codes, self.gradient_checkpointing, self.enabled = freeze_codes, gradient_checkpointing, enabled

    def run(self, ctx: StageContext) -> dict[str, Any]:
        student, loss, cfg = ctx.student, ctx.recipe.loss, ctx.cfg
        require(loss is not None, f"stage '{self.name}' trains the whole model but the recipe has no loss; set loss=...")
        self.prepare(student, ctx.recipe)
        lr = cfg.optimizer.get("lr")
        groups = partial(parameter_groups, train=self.train, key=f"stages.{self.name}.train",
                         qparams_lr=None if lr is None or self.qparams_lr_scale == 1.0 else lr * self.qparams_lr_scale,
                         weight_decay=cfg.optimizer.get("weight_decay") or 0.0)
        groups(student)  # sets requires_grad before any strategy wraps the student (DDP registers hooks then)
        teacher = ctx.teacher if loss.needs_teacher else None
        cached = teacher is not None and attach_teacher_cache(cfg.get("teacher_cache"), teacher, ctx.tokenizer,
                                                              ctx.datamodule, cfg.paths.cache_dir)
        module = QATModule(
            None if cached else teacher, student, loss,
            optimizer=hydra.utils.instantiate(cfg.optimizer),
            scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
            param_groups=groups, state=ctx.recipe,
        )
        loss.prepare(None if cached else teacher, ctx.datamodule.train_dataloader())
        fit(ctx, module)
        trainer = ctx.trainer
        results: dict[str, Any] = {"train/steps": trainer.global_step, "train/bad_steps": ctx.guard.bad_steps if ctx.guard else 0}
        if "train/loss" in trainer.callback_metrics:
            results["train/loss"] = trainer.callback_metrics["train/loss"].item()  # the last step's
        elif ctx.resume_state is not None and ctx.resume_state.train_loss is not None:
            results["train/loss"] = ctx.resume_state.train_loss  # resumed after the last step: the checkpoint kept it
        return results

    def prepare(self, student: torch.nn.Module, recipe: Any) -> None:
        """Before the fit: freeze the codes (E2E-QP) and turn on gradient checkpointing, as configured."""
        if self.freeze_codes:
            for layer in recipe.layers(student).values():
                if isinstance(layer, FakeQuantLinear) and layer.weight_quantizer is not None:
                    layer.weight_quantizer.freeze_codes(layer.weight)
        if self.gradient_checkpointing:
            student.config.use_cache = False
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def describe(self) -> dict[str, Any]:
        return {"train": self.train, "qparams_lr_scale": self.qparams_lr_scale, "freeze_codes": self.freeze_codes}


def fit(ctx: StageContext, module: QATModule) -> None:
    """trainer.fit, resuming from the checkpoint if there is one. In one process the train loader is a
    ReplayLoader, so a resume continues with the very batch the killed run would have seen next."""
    trainer, datamodule = ctx.trainer, ctx.datamodule
    checkpoint = ctx.resume.checkpoint if ctx.resume else None
    if trainer.world_size > 1:  # Lightning shards the loader per rank; mid-epoch order is Lightning's own
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint)
        return
    ctx.resume_state.loader = ReplayLoader(datamodule.train_dataloader())
    with warnings.catch_warnings():  # ReplayLoader is what makes this resume exact; Lightning cannot see that
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        trainer.fit(module, train_dataloaders=ctx.resume_state.loader, val_dataloaders=datamodule.val_dataloader(),
                    ckpt_path=checkpoint)
