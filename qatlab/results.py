"""The results store: one JSON line per finished (or failed) run, appended to a shared file.

Every run of a sweep appends to the same file (conf `results_file`, default
outputs/results.jsonl), so `python -m qatlab.report` and notebooks/ can compare runs without
W&B. A line is written with one O_APPEND write of a complete line, under an exclusive lock,
so concurrent jobs never interleave and a kill never leaves half a line that parses.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from qatlab.atomic import atomic_write_text
from qatlab.errors import QatlabError

# The columns a row has (zero-shot scores `test/<task>/acc` are added as they exist).
COLUMNS = (
    "status", "task_name", "method", "quantizer", "init", "loss", "stages", "model", "w_bits", "a_bits", "kv_bits",
    "group_size", "w_grid", "w_bits_label", "dense_layers", "bits_per_weight", "steps", "tokens_seen",
    "test/ppl_teacher", "test/ppl_rtn", "test/ppl_student", "compute/cpu_minutes", "curve", "time/wall_s", "device",
    "llama_cpp_error", "git_commit", "output_dir", "finished_at",
)


# PPLs that must be finite for a run to count: a non-finite one records the run as failed.
MUST_BE_FINITE = ("test/ppl_teacher", "test/ppl_student", "test/ppl_packed", "test/ppl_hf", "test/ppl_compressed_tensors",
                  "test/ppl_gguf", "test/ppl_gguf_llama_cpp")


def nonfinite_failure(results: dict[str, Any]) -> str | None:
    """Why the run's numbers are unusable (a PPL that is inf or NaN), or None when they are fine."""
    bad = [f"{key}={results[key]}" for key in MUST_BE_FINITE
           if isinstance(results.get(key), float) and not math.isfinite(results[key])]
    if not bad:
        return None
    return (f"the run finished with a non-finite PPL ({', '.join(bad)}), so it is recorded as failed: its weights "
            f"diverged or overflowed (train/bad_steps={results.get('train/bad_steps', 0)}); lower optimizer.lr, "
            "use bf16 instead of fp16, or check the method's settings, then run it again")


def run_row(results: dict[str, Any], **context: Any) -> dict[str, Any]:
    """A store row from a run's results dict plus context (task_name, output_dir, tokens_seen...)."""
    row = {"status": results.get("status", "ok"), **context}
    if results.get("error"):
        row["error"] = results["error"][:500]
    for key in COLUMNS:
        if key in results:
            row[key] = results[key]
    row.update({k: v for k, v in results.items() if k.startswith("test/") and k not in row})
    row.setdefault("steps", results.get("train/steps", 0))
    row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return row


def error_line(error: BaseException) -> str:
    """'<Type>: <first line of the message>', at most 500 characters: what a row says of a failure."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {message}"[:500]


def failed_row(error: BaseException, **context: Any) -> dict[str, Any]:
    """A row that records a failed sweep job, so the report shows the hole instead of hiding it."""
    return {"status": "failed", "error": error_line(error), **context,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_results(out_dir: str | Path, results: dict[str, Any], results_file: str | Path | None,
                  row: dict[str, Any] | None = None) -> None:
    """<out_dir>/results.json, then one row in the store. Call after printing the table: a failing write
    names its file and says where the numbers still are."""
    path = Path(out_dir) / "results.json"
    try:
        atomic_write_text(path, json.dumps(results, indent=2))
    except OSError as e:
        raise QatlabError(f"could not write '{path}' ({e.strerror or e}); the run's numbers are in the table above; "
                          "make paths.output_dir writable (or point hydra.run.dir elsewhere) for the next run") from None
    if not results_file:
        return
    try:
        append_row(results_file, row if row is not None else run_row(results))
    except OSError as e:
        raise QatlabError(f"results_file='{results_file}' could not be written ({e.strerror or e}); the run's numbers "
                          f"are in {path} and the table above; give a writable results_file (or QATLAB_RESULTS)") from None


def append_row(path: str | Path, row: dict[str, Any]) -> Path:
    """Append one row as a single locked write of a whole line."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, sort_keys=False, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
    finally:
        os.close(fd)  # closing releases the lock
    return path


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a store. A line that does not parse is skipped; if it is a torn line (a writer killed
    mid-write, outside qatlab's single-write append) with a whole row appended after it, that row is kept."""
    path = Path(path).expanduser()
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        row = _parse_row(line)
        if row is None:
            start = line.rfind('{"status"')  # every qatlab row starts with its status key
            row = _parse_row(line[start:]) if start > 0 else None
        if row is not None:
            rows.append(row)
    return rows


def _parse_row(text: str) -> dict[str, Any] | None:
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None
