"""Checks that run before any heavy work: every error names the key, the bad value and what is allowed.

validate_config(cfg)   the whole config, before any model loads (and the resume dir, if any)
check_loaded(...)      what needs the teacher's config/tokenizer, right after it loads and before
                       data generation, clip search, evaluation or training
Checks that live with their objects stay there (QuantConfig: bits, group size, grid; the method
registry: method names and options; corpora and model loading: paths); these add the rest.
"""

from __future__ import annotations

import logging
import typing
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig

from qatlab.checkpointing import ResumeFrom, check_same_config, config_identity, find_resume
from qatlab.errors import require
from qatlab.models.layer_maps import LAYER_MAPS

log = logging.getLogger("qatlab")

DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = typing.get_args(_PRECISION_INPUT_STR) + typing.get_args(_PRECISION_INPUT_STR_ALIAS)


class RiskySettingWarning(UserWarning):
    """A config that runs but is likely to go wrong (e.g. fp16 with KL losses)."""


def validate_config(cfg: DictConfig) -> ResumeFrom | None:
    """Check everything the config alone can tell; return where a resume starts (None: a fresh run)."""
    check_trainer(cfg.trainer)
    check_data(cfg.data)
    check_model(cfg.model)
    check_run(cfg)
    warn_risky(cfg)
    return check_resume(cfg)


# ---- trainer ---------------------------------------------------------------------------------


def check_trainer(trainer: DictConfig) -> None:
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, str):  # a _target_ mapping is Lightning's to check
        known = ["auto", *StrategyRegistry.available_strategies()]
        require(strategy in known, f"trainer.strategy='{strategy}' is not known; use one of {known}")
    precision = str(trainer.get("precision", "32-true"))
    require(precision in PRECISIONS, f"trainer.precision='{precision}' is not known; use one of {list(PRECISIONS)}")
    accelerator = trainer.get("accelerator", "auto")
    known = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
    require(accelerator in known, f"trainer.accelerator='{accelerator}' is not known; use one of {known}")
    require(
        accelerator not in ("gpu", "cuda") or torch.cuda.is_available(),
        f"trainer.accelerator='{accelerator}' but no CUDA device is visible; use trainer=cpu or a GPU machine",
    )
    _positive_int(trainer.get("max_steps"), "trainer.max_steps", "e.g. 40")
    _positive_int(trainer.get("accumulate_grad_batches", 1), "trainer.accumulate_grad_batches", "1 = no accumulation")
    clip = trainer.get("gradient_clip_val")
    require(clip is None or (_is_number(clip) and clip >= 0),
            f"trainer.gradient_clip_val={clip!r} must be a number >= 0, or null for no clipping")


# ---- data ------------------------------------------------------------------------------------


def check_data(data: DictConfig) -> None:
    from qatlab.data.corpora import SOURCES
    from qatlab.eval.protocols import PROTOCOLS

    source = data.get("source")
    if source is not None:
        require(source in SOURCES, f"data.source='{source}' is not known; use one of {sorted(SOURCES)}")
    eval_source = data.get("eval_source")
    if eval_source is not None:
        require(eval_source in SOURCES, f"data.eval_source='{eval_source}' is not known; use one of {sorted(SOURCES)} "
                                        "or null (= data.source)")
    protocol = data.get("eval_protocol", "pinned")
    require(protocol in PROTOCOLS, f"data.eval_protocol='{protocol}' is not known; use one of {list(PROTOCOLS)}")
    for key in ("eval_windows",):
        if key in data:
            _positive_int(data[key], f"data.{key}", "windows the gptq_c4 protocol draws, e.g. 256")
    seed = data.get("eval_seed", 0)
    require(isinstance(seed, int) and not isinstance(seed, bool), f"data.eval_seed={seed!r} must be an integer")
    if data.get("eval_min_tokens") is not None:
        _positive_int(data.eval_min_tokens, "data.eval_min_tokens", "or null for data.eval_block_size")
    for key in ("block_size", "eval_block_size", "batch_size", "eval_batch_size"):
        if key in data:
            _positive_int(data[key], f"data.{key}", "a number of tokens or sequences")
    for key in ("max_train_blocks", "max_eval_blocks", "max_test_blocks"):
        if data.get(key) is not None:
            _positive_int(data[key], f"data.{key}", "or null for no cap")
    if source == "local":
        check_local_corpus(data.get("source_kwargs") or {})
    if eval_source == "local":
        check_local_corpus(data.get("eval_source_kwargs") or {}, "data.eval_source_kwargs")


def check_local_corpus(kwargs: DictConfig, prefix: str = "data.source_kwargs") -> None:
    """data=local: the files exist and hold text (read only until the first non-blank character)."""
    splits = kwargs.get("splits") or {}
    paths = {f"{prefix}.splits.{s}": p for s, p in splits.items()} or {f"{prefix}.path": kwargs.get("path")}
    for key, path in paths.items():
        require(path is not None, f"{key} is missing; give a .txt/.jsonl file or a folder of .txt files")
        p = Path(str(path)).expanduser()
        require(p.exists(), f"{key}='{path}' does not exist; give a .txt/.jsonl file or a folder of .txt files")
        files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
        require(any(_has_text(f) for f in files),
                f"{key}='{path}' has no text (empty or blank); give a file or folder that holds documents")


def _has_text(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


# ---- model and the rest ------------------------------------------------------------------------


def check_model(model: DictConfig) -> None:
    name = model.get("name_or_path")
    require(isinstance(name, str) and name.strip() != "",
            f"model.name_or_path={name!r} must name a model (a hub id, a folder, tiny-llama or the embedded one)")
    for key in ("dtype", "student_dtype"):
        value = model.get(key, "float32")
        require(value in DTYPES, f"model.{key}='{value}' is not known; use one of {list(DTYPES)}")


def check_run(cfg: DictConfig) -> None:
    require(isinstance(cfg.get("seed"), int) and not isinstance(cfg.seed, bool),
            f"seed={cfg.get('seed')!r} must be an integer")
    init = cfg.get("init_batches", 0)
    require(isinstance(init, int) and init >= 0, f"init_batches={init!r} must be an integer >= 0")
    _positive_int(cfg.eval.get("batch_size", 1), "eval.batch_size", "sequences per PPL forward")
    guard = (cfg.get("guard") or {}).get("max_bad_steps", 10)
    _positive_int(guard, "guard.max_bad_steps", "bad steps in a row before the run stops, e.g. 10")
    lr = (cfg.get("optimizer") or {}).get("lr")
    require(lr is None or (_is_number(lr) and lr > 0), f"optimizer.lr={lr!r} must be a number > 0 (e.g. 5e-5)")
    from qatlab.callbacks.compute_budget import check_budget

    check_budget(cfg.get("budget"), cfg.get("scheduler"))


def warn_risky(cfg: DictConfig) -> None:
    """Settings that run but often end in NaNs or wasted time: a warning, not an error."""
    fp16 = "16" in str(cfg.trainer.get("precision", "")).replace("bf16", "") or "float16" in (
        cfg.model.get("dtype"), cfg.model.get("student_dtype"))
    if fp16 and cfg.get("stages"):
        _warn(f"fp16 with a KL distillation loss (method={cfg.method.get('name')}, "
              f"trainer.precision={cfg.trainer.get('precision')}, model.student_dtype={cfg.model.get('student_dtype')}): "
              "softmax over a large vocabulary overflows fp16 and gives NaN steps; prefer trainer.precision=bf16-mixed "
              "and float32/bfloat16 dtypes")


def check_resume(cfg: DictConfig) -> ResumeFrom | None:
    resume = find_resume(cfg.get("resume"), cfg.paths.output_dir)
    if resume is None:
        return None
    check_same_config(resume.run_dir, config_identity(cfg))
    if resume.checkpoint is None:
        log.warning("resume=%s: no checkpoint in %s/checkpoints, so training starts from step 0 (Hydra run dirs are "
                    "time-stamped: pass hydra.run.dir=<the run's dir> or resume=<the run's dir>)",
                    cfg.resume, resume.run_dir)
    return resume


# ---- after the teacher loads -------------------------------------------------------------------


def check_loaded(cfg: DictConfig, method: Any, model: torch.nn.Module, tokenizer: Any) -> None:
    """What needs the loaded teacher: context length, tokenizer vs embedding, K/V hooks."""
    context = getattr(model.config, "max_position_embeddings", None)
    for key in ("block_size", "eval_block_size"):
        size = cfg.data[key]
        require(context is None or size <= context,
                f"data.{key}={size} is longer than the model's context ({context} tokens); set data.{key} <= {context}")
    rows = model.get_input_embeddings().num_embeddings
    source = cfg.model.get("tokenizer") or cfg.model.name_or_path
    require(len(tokenizer) <= rows,
            f"the tokenizer of '{source}' has {len(tokenizer)} tokens but the model's embedding has {rows} rows: "
            "they are not a pair; set model.tokenizer to the model's own tokenizer (or null)")
    if method.kv_config is not None:
        model_type = getattr(model.config, "model_type", None)
        require(model_type in LAYER_MAPS and getattr(model, "_supports_attention_backend", False),
                f"method.kv.bits={method.kv_config.bits} needs attention hooks (transformers' attention interface "
                f"and a qatlab layer map), which {type(model).__name__} (model_type '{model_type}') does not have; "
                "set method.kv=null for this model")


# ---- helpers ------------------------------------------------------------------------------------


def _positive_int(value: Any, key: str, hint: str) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{key}={value!r} must be a positive integer ({hint})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, RiskySettingWarning, stacklevel=3)
