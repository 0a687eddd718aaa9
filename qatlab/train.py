"""One run: build teacher, student, data and trainer from the config; fit; evaluate; report."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from qatlab.errors import QatlabError, require
from qatlab.eval.perplexity import perplexity
from qatlab.eval.table import markdown_table
from qatlab.methods import QuantMethod, build_method
from qatlab.models import load_causal_lm
from qatlab.module import QATModule

log = logging.getLogger("qatlab")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment; return the metrics dict (also written to <output_dir>/results.json)."""
    started = time.time()
    L.seed_everything(cfg.seed, workers=True)
    method = hydra.utils.instantiate(cfg.method)
    teacher, tokenizer = load_causal_lm(**model_loader_args(cfg.model))
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.set_tokenizer(tokenizer)
    check_block_sizes(cfg, teacher)
    datamodule.setup("fit")

    student = make_student(teacher, method, cfg.model.student_dtype)
    method.init(student, teacher, calibration_batches(datamodule, cfg.init_batches))
    log.info("quantized %d layers with %s", len(method.quantized_layers), method.describe())

    test_blocks = datamodule.test_blocks()
    results: dict[str, Any] = {**method.describe(), "model": cfg.model.name_or_path}
    results["test/ppl_teacher"] = evaluate(teacher, test_blocks, cfg, "teacher")
    if cfg.eval.rtn_baseline and method.name != "rtn":
        results["test/ppl_rtn"] = evaluate_rtn(teacher, method, test_blocks, cfg)

    trainer = build_trainer(cfg)
    log_config(trainer, cfg)
    if method.trains:
        module = QATModule(
            teacher, student, method,
            optimizer=hydra.utils.instantiate(cfg.optimizer),
            scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        results["train/steps"] = trainer.global_step
    results["test/ppl_student"] = evaluate(student, test_blocks, cfg, "student")
    results["test/windows"] = len(test_blocks)
    results["time/wall_s"] = round(time.time() - started, 1)

    finish(trainer, method, student, cfg, results)
    return results


def model_loader_args(model_cfg: DictConfig) -> dict[str, Any]:
    """The model group minus the keys that are not load_causal_lm arguments."""
    args = OmegaConf.to_container(model_cfg, resolve=True)
    args.pop("student_dtype", None)
    return args


def check_block_sizes(cfg: DictConfig, model: torch.nn.Module) -> None:
    context = getattr(model.config, "max_position_embeddings", None)
    for key in ("block_size", "eval_block_size"):
        size = cfg.data[key]
        require(
            context is None or size <= context,
            f"data.{key}={size} is longer than the model's context ({context} tokens); "
            f"set data.{key} <= {context}",
        )


def make_student(teacher: torch.nn.Module, method: QuantMethod, dtype: str) -> torch.nn.Module:
    """A copy of the teacher (its own Parameters) with the method's fake-quant layers swapped in."""
    require(dtype in DTYPES, f"model.student_dtype='{dtype}' is not known; use one of {sorted(DTYPES)}")
    student = copy.deepcopy(teacher).to(DTYPES[dtype])
    for p in student.parameters():
        p.requires_grad_(True)
    method.convert(student)
    return student


def calibration_batches(datamodule: L.LightningDataModule, n: int) -> list[dict]:
    """The first n training batches, for methods whose init needs activations."""
    batches = []
    for batch in datamodule.train_dataloader():
        if len(batches) >= n:
            break
        batches.append(batch)
    return batches


def eval_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate(model: torch.nn.Module, blocks: torch.Tensor, cfg: DictConfig, who: str) -> float:
    device = eval_device()
    model.to(device)
    return perplexity(model, blocks, batch_size=cfg.eval.batch_size, desc=f"ppl {who}")


def evaluate_rtn(teacher: torch.nn.Module, method: QuantMethod, blocks: torch.Tensor, cfg: DictConfig) -> float:
    """RTN at the method's own weight/activation settings: the baseline row next to it."""
    rtn = build_method("rtn", weight=_as_dict(method.weight_config), activation=_as_dict(method.act_config),
                       include=method.include, exclude=method.exclude)
    baseline = make_student(teacher, rtn, cfg.model.student_dtype)
    ppl = evaluate(baseline, blocks, cfg, "rtn")
    del baseline
    return ppl


def _as_dict(config: Any) -> dict | None:
    """A QuantConfig back into the keyword form QuantConfig.from_dict takes."""
    if config is None:
        return None
    return {k: v for k, v in dataclasses.asdict(config).items() if k != "name"}


def build_trainer(cfg: DictConfig) -> L.Trainer:
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def log_config(trainer: L.Trainer, cfg: DictConfig) -> None:
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))


def finish(trainer: L.Trainer, method: QuantMethod, student: torch.nn.Module, cfg: DictConfig,
           results: dict[str, Any]) -> None:
    """Log final metrics, write results.json, optionally export, print the table."""
    numbers = {k: v for k, v in results.items() if "/" in k and isinstance(v, (int, float))}
    for logger in trainer.loggers:
        logger.log_metrics(numbers, step=trainer.global_step)
        logger.finalize("success")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("export"):
        results["export_dir"] = str(method.export(student, out / "export"))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(results_table(results, cfg))


def results_table(results: dict[str, Any], cfg: DictConfig) -> str:
    bits = f"W{results['w_bits']}A{results['a_bits']}"
    group = f" g{results['group_size']}" if results.get("group_size") else ""
    rows = [("teacher", "16", results["test/ppl_teacher"])]
    if "test/ppl_rtn" in results:
        rows.append(("rtn", bits + group, results["test/ppl_rtn"]))
    rows.append((f"{results['method']} (student)", bits + group, results["test/ppl_student"]))
    windows = results["test/windows"]
    note = (
        f"test PPL: {windows} windows x {cfg.data.eval_block_size} tokens of '{cfg.data.source}' test split"
        f" (first {windows} windows; capped by data.max_test_blocks={cfg.data.max_test_blocks})"
        if cfg.data.max_test_blocks else
        f"test PPL: the whole '{cfg.data.source}' test split, {windows} windows x {cfg.data.eval_block_size} tokens"
    )
    return f"\n{markdown_table(['model', 'bits', 'test PPL'], rows)}\n{note}; wall time {results['time/wall_s']} s\n"
