"""Zero-shot accuracy of a (fake-quant) HF causal LM through lm-eval (EleutherAI's harness).

The model instance is wrapped as lm-eval's HFLM (it accepts a PreTrainedModel and a tokenizer), so
what is scored is exactly what the run evaluates: the student's fake-quant layers included.

Tasks:
  offline  `analogies`: built at run time from gensim's word analogies (qatlab.eval.analogy_task);
           runs anywhere, no network.
  standard any lm-eval task name (piqa, hellaswag, winogrande, arc_easy, arc_challenge, boolq,
           ...): passed through; lm-eval downloads their datasets from the hub (online only).
`limit` scores the first N documents of each task (the analogy documents are shuffled by `seed`,
so that is a random sample across its sections); multiple-choice tasks report acc and acc_norm.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import nn

from qatlab.errors import QatlabError, require
from qatlab.eval import analogy_task
from qatlab.models.embedded import default_cache_dir

log = logging.getLogger("qatlab")

OFFLINE_TASKS = {analogy_task.TASK: analogy_task.write_task}  # name -> writer(root, seed) -> task dir
STANDARD_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq")
METRICS = ("acc", "acc_norm")


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise QatlabError(
            "zero-shot evaluation needs lm-eval: pip install -e \".[eval]\" (or set eval.zero_shot.tasks=[])"
        ) from e


def check_options(tasks: Sequence[str], limit: int | None, batch_size: int) -> None:
    """Cheap checks, before any model runs."""
    require(
        all(isinstance(t, str) and t for t in tasks),
        f"eval.zero_shot.tasks={list(tasks)} must be a list of task names, e.g. [{analogy_task.TASK}]",
    )
    require(
        limit is None or (isinstance(limit, int) and limit > 0),
        f"eval.zero_shot.limit={limit!r} must be a positive integer (documents per task) or null for all",
    )
    require(
        isinstance(batch_size, int) and batch_size > 0,
        f"eval.zero_shot.batch_size={batch_size!r} must be a positive integer (e.g. 8)",
    )


@lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...], defaults: bool):
    # Indexing lm-eval's ~15k built-in task YAMLs takes 15-30 s on 2 CPU cores: only when a
    # standard task is asked for, and once per process.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults, verbosity="ERROR")


def task_manager(tasks: Sequence[str], cache_dir: str | Path | None = None, seed: int = 0):
    """An lm-eval TaskManager that knows every requested task; unknown names are one clear error."""
    require_lm_eval()
    root = Path(cache_dir or default_cache_dir()) / "zero_shot"
    include = tuple(sorted({str(OFFLINE_TASKS[t](root, seed)) for t in tasks if t in OFFLINE_TASKS}))
    manager = _task_manager(include, any(t not in OFFLINE_TASKS for t in tasks))
    unknown = [t for t in tasks if t not in OFFLINE_TASKS and t not in manager.all_tasks]
    require(
        not unknown,
        f"eval.zero_shot.tasks: unknown task(s) {unknown}; use {sorted(OFFLINE_TASKS)} (offline) or an lm-eval "
        f"task name such as {', '.join(STANDARD_TASKS)} (those download their datasets from the hub)",
    )
    return manager


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | None = 200,
    batch_size: int = 8,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """{"test/<task>/acc": ..., "test/<task>/acc_norm": ...} of `model` (on its current device)."""
    tasks = list(tasks)
    check_options(tasks, limit, batch_size)
    manager = task_manager(tasks, cache_dir, seed)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(
        model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False,
        bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, verbosity="ERROR",
    )
    model.train(was_training)
    return scores(out["results"], tasks)


def scores(results: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, float]:
    """lm-eval's results ({"<task>": {"acc,none": ...}}) as flat `test/<task>/<metric>` numbers."""
    flat = {}
    for task in tasks:
        for metric in METRICS:
            value = results.get(task, {}).get(f"{metric},none")
            if isinstance(value, (int, float)):
                flat[f"test/{task}/{metric}"] = float(value)
    return flat


def check(options: Mapping[str, Any], cache_dir: str | Path | None) -> None:
    """Validate eval.zero_shot up front (lm-eval installed, known tasks, limit, batch size)."""
    tasks = list(options["tasks"])
    check_options(tasks, options.get("limit", 200), options.get("batch_size", 8))
    task_manager(tasks, cache_dir, options.get("seed", 0))


def teacher_and_student(
    teacher: nn.Module, student: nn.Module, tokenizer: Any, options: Mapping[str, Any], cache_dir: str | Path | None
) -> dict[str, float]:
    """The run's zero-shot numbers: the student's as `test/<task>/<metric>`, the teacher's with `_teacher`."""
    kwargs = {"tasks": list(options["tasks"]), "limit": options.get("limit", 200),
              "batch_size": options.get("batch_size", 8), "seed": options.get("seed", 0), "cache_dir": cache_dir}
    teacher_scores = zero_shot(teacher, tokenizer, **kwargs)
    student_scores = zero_shot(student, tokenizer, **kwargs)
    for key, value in student_scores.items():
        log.info("zero-shot %s: teacher %.4f, student %.4f", key, teacher_scores.get(key, float("nan")), value)
    return {**student_scores, **{f"{k}_teacher": v for k, v in teacher_scores.items()}}
