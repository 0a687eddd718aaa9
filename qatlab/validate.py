"""Checks that run before any heavy work: every error names the key, the bad value and what is allowed.

validate_config(cfg)   the whole config, before any model loads (and the resume dir, if any)
check_loaded(...)      what needs the teacher's config/tokenizer, right after it loads and before
                       data generation, clip search, evaluation or training
Checks that live with their objects stay there (QuantConfig: bits, group size, grid; the method
registry: method names and options; corpora and model loading: paths); these add the rest.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import typing
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig, OmegaConf

from qatlab.checkpointing import ResumeFrom, check_fresh_run_dir, check_same_config, config_identity, find_resume
from qatlab.errors import QatlabError, require
from qatlab.models.layer_maps import LAYER_MAPS

log = logging.getLogger("qatlab")

DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = typing.get_args(_PRECISION_INPUT_STR) + typing.get_args(_PRECISION_INPUT_STR_ALIAS)


class RiskySettingWarning(UserWarning):
    """A config that runs but is likely to go wrong (e.g. fp16 with KL losses)."""


def validate_config(cfg: DictConfig) -> ResumeFrom | None:
    """Check everything the config alone can tell; return where a resume starts (None: a fresh run)."""
    check_finite(cfg)
    check_trainer(cfg.trainer)
    check_data(cfg.data)
    check_model(cfg.model)
    check_run(cfg)
    check_optimizer(cfg.get("optimizer"), cfg.get("scheduler"))
    check_teacher_cache(cfg.get("teacher_cache"))
    check_checkpoint(cfg.get("checkpoint"))
    check_exports(cfg)
    warn_risky(cfg)
    resume = check_resume(cfg)
    check_outputs(cfg)
    return resume


def check_finite(cfg: DictConfig) -> None:
    """No number anywhere in the config may be inf or NaN (YAML and Hydra read `inf` / `nan` as floats)."""
    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif isinstance(node, float) and not math.isfinite(node):
            raise QatlabError(f"{key}={node} is not a finite number; give a finite value (null where the key allows "
                              "'none', e.g. trainer.gradient_clip_val=null for no clipping)")

    walk(OmegaConf.to_container(cfg, resolve=True), "")


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
    """data=local: the files exist, are UTF-8, parse (.jsonl: every line) and hold text: read in full here, so a
    bad byte or line fails before any model loads, naming the file and the line."""
    from qatlab.data.corpora import read_local

    splits = kwargs.get("splits") or {}
    paths = {f"{prefix}.splits.{s}": p for s, p in splits.items()} or {f"{prefix}.path": kwargs.get("path")}
    for key, path in paths.items():
        require(path is not None, f"{key} is missing; give a .txt/.jsonl file or a folder of .txt files")
        docs = read_local(str(path), kwargs.get("text_field", "text"), key=key)
        require(any(d.strip() for d in docs),
                f"{key}='{path}' has no text (empty or blank); give a file or folder that holds documents")


# ---- model and the rest ------------------------------------------------------------------------


def check_model(model: DictConfig) -> None:
    from qatlab.models.loading import check_local_model

    name = model.get("name_or_path")
    require(isinstance(name, str) and name.strip() != "",
            f"model.name_or_path={name!r} must name a model (a hub id, a folder, tiny-llama or the embedded one)")
    check_local_model(name, "model.name_or_path", gguf_file=model.get("gguf_file"))
    if model.get("tokenizer"):
        check_local_model(model.tokenizer, "model.tokenizer", tokenizer=True)
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
    from qatlab.callbacks.compute_budget import check_budget

    check_budget(cfg.get("budget"), cfg.get("scheduler"))


MAX_LR = 1.0  # above it no QAT fine-tuning recipe works: the first step destroys the pretrained weights


def check_optimizer(optimizer: DictConfig | None, scheduler: DictConfig | None) -> None:
    """Learning rate, weight decay, betas, eps and warmup: finite and in the range where training can work."""
    optimizer = optimizer or {}
    lr = optimizer.get("lr")
    require(lr is None or (_is_number(lr) and 0 < lr <= MAX_LR),
            f"optimizer.lr={lr!r} must be a finite number in (0, {MAX_LR}] (QAT fine-tuning uses about 1e-6 to 1e-3, "
            "e.g. 5e-5)")
    decay = optimizer.get("weight_decay")
    require(decay is None or (_is_number(decay) and 0 <= decay <= 1),
            f"optimizer.weight_decay={decay!r} must be a number in [0, 1] (e.g. 0.0 or 0.01)")
    betas = optimizer.get("betas")
    if betas is not None:
        require(len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas),
                f"optimizer.betas={list(betas)!r} must be two numbers in [0, 1) (e.g. [0.9, 0.95])")
    eps = optimizer.get("eps")
    require(eps is None or (_is_number(eps) and 0 < eps < 1), f"optimizer.eps={eps!r} must be a number in (0, 1) (e.g. 1e-8)")
    warmup = (scheduler or {}).get("num_warmup_steps")
    require(warmup is None or (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0),
            f"scheduler.num_warmup_steps={warmup!r} must be an integer >= 0")


def check_teacher_cache(cache: DictConfig | None) -> None:
    """teacher_cache.*: checked whenever it is enabled, before the teacher loads and evaluates."""
    if not cache or not cache.get("enabled"):
        return
    require(cache.get("enabled") is True, f"teacher_cache.enabled={cache.get('enabled')!r} must be true or false")
    from qatlab.data.logit_cache import DTYPES as CACHE_DTYPES

    for key, hint in (("k", "tokens kept per position, e.g. 64"), ("shard_size", "blocks per shard file, e.g. 256"),
                      ("batch_size", "teacher batch while building, e.g. 8")):
        if key in cache:
            _positive_int(cache[key], f"teacher_cache.{key}", hint)
    dtype = cache.get("dtype", "float32")
    require(dtype in CACHE_DTYPES, f"teacher_cache.dtype='{dtype}' is not known; use one of {sorted(CACHE_DTYPES)}")


def check_checkpoint(checkpoint: DictConfig | None) -> None:
    if not checkpoint:
        return
    minutes = checkpoint.get("every_minutes")
    require(minutes is None or (_is_number(minutes) and minutes > 0),
            f"checkpoint.every_minutes={minutes!r} must be a number of minutes > 0, or null for no timed saves")
    for key in ("at_end", "on_signal"):
        require(isinstance(checkpoint.get(key, True), bool), f"checkpoint.{key}={checkpoint.get(key)!r} must be true or false")
    unknown = sorted(set(checkpoint) - {"every_minutes", "at_end", "on_signal"})
    require(not unknown, f"checkpoint has {unknown}, unknown keys; valid: ['at_end', 'every_minutes', 'on_signal']")


def check_exports(cfg: DictConfig) -> None:
    """export= names known formats, export_options are valid, eval.exports scores only formats that are written."""
    from qatlab.export import ship

    ship.scored(ship.options_from(cfg), cfg.eval.get("exports"), cfg.eval.get("packed"))


# ---- where the run writes ------------------------------------------------------------------------


def check_outputs(cfg: DictConfig) -> None:
    """Every place the run will write, checked (and created) before any model loads, so a finished run
    never fails at its last write: the run dir, the cache dirs, the results store."""
    folders = {"paths.output_dir": cfg.paths.output_dir, "paths.cache_dir": cfg.paths.get("cache_dir")}
    cache = cfg.get("teacher_cache") or {}
    if cache.get("enabled") and cache.get("dir"):
        folders["teacher_cache.dir"] = cache.dir
    clip = cfg.get("init") or {}  # init=clip (BitDistiller) writes its search cache
    if isinstance(clip, DictConfig) and clip.get("cache_dir") and clip.get("cache", True):
        folders["init.cache_dir"] = clip.cache_dir
    for key, folder in folders.items():
        if folder:
            writable_folder(key, folder)
    if cfg.get("results_file"):
        writable_file("results_file", cfg.results_file)


def writable_folder(key: str, folder: str | Path) -> Path:
    """Create the folder if needed and write (then delete) a probe file in it; an error names key and reason."""
    problem = _unwritable(Path(str(folder)).expanduser())
    require(problem is None, f"{key}='{folder}' {problem}; give a folder this user can write to")
    return Path(str(folder)).expanduser()


def writable_file(key: str, file: str | Path) -> None:
    """A file the run will append to: not a folder, its folder writable, the file itself appendable."""
    path = Path(str(file)).expanduser()
    require(not path.is_dir(), f"{key}='{file}' is a folder; give a file path (e.g. {key}={path / 'results.jsonl'})")
    problem = _unwritable(path.parent)
    require(problem is None, f"{key}='{file}' cannot be written: its folder '{path.parent}' {problem}; give a path "
                             "this user can write to")
    if path.exists():
        try:
            with open(path, "ab"):
                pass
        except OSError as e:
            raise QatlabError(f"{key}='{file}' cannot be appended to ({e.strerror or e}); give a writable file") from None


def _unwritable(path: Path) -> str | None:
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".qatlab-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"is not writable ({e.strerror or e})"
    return None


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
    """Where a resume starts (its config must match, up to SAFE_ON_RESUME keys); a fresh run may not take over a
    run dir of another config."""
    resume = find_resume(cfg.get("resume"), cfg.paths.output_dir)
    identity = config_identity(cfg)
    output_dir = Path(str(cfg.paths.output_dir))
    if resume is None or resume.run_dir.resolve() != output_dir.resolve():
        check_fresh_run_dir(output_dir, identity)
    if resume is None:
        return None
    check_same_config(resume.run_dir, identity)
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
    cache = cfg.get("teacher_cache") or {}
    if cache.get("enabled"):
        require(cache.k <= rows, f"teacher_cache.k={cache.k} is more than the model's vocabulary ({rows} tokens); "
                                 f"use teacher_cache.k <= {rows} (k = vocab is exact)")
        loss = method.loss
        require(not (method.trains and loss is not None and loss.needs_hidden_states),
                f"loss '{getattr(loss, 'name', '')}' of method '{method.name}' needs the teacher's hidden states, which "
                "the teacher cache does not hold; set teacher_cache.enabled=false (or loss.hidden_mse=0)")
    if method.kv_config is not None:  # pre_rope hooks k_proj/v_proj through the layer map; post_rope also the interface
        model_type = getattr(model.config, "model_type", None)
        post_rope = method.kv_placement.position == "post_rope"
        require(model_type in LAYER_MAPS and (not post_rope or getattr(model, "_supports_attention_backend", False)),
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
