"""Checkpoints that survive kills and load without running pickled code, and which run a resume continues.

- AtomicCheckpointIO: Lightning writes every checkpoint to a temp name and renames it (qatlab.atomic),
  and reads it back with torch.load(weights_only=True): plain tensors and containers only.
- The run file `<run dir>/qatlab_run.json` records the config a run was started with; a resume from
  that dir with another config is refused, naming the keys that differ. Paths are not part of the
  config's identity: the same run may be resumed from another folder or with another cache.
  SAFE_ON_RESUME lists the keys a resume may change (how long, how fast, how it logs and guards).
- A fresh run (resume=null) in a dir that holds another config's run is refused: it would overwrite
  that run's file and checkpoints, after which neither config could resume.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from qatlab.atomic import atomic_path, atomic_write_text
from qatlab.errors import QatlabError, require

log = logging.getLogger("qatlab")

RUN_FILE = "qatlab_run.json"
LAST = "last.ckpt"
# Top-level keys that say where a run writes or how it starts, not what it computes.
NOT_IDENTITY = ("resume", "paths", "results_file", "sweep_continue_on_error")
# Keys a resume may change (fnmatch patterns over dotted keys): they set how long the run goes, its learning
# rate from the resumed step on, how it guards, logs and checkpoints; not what a step computes from its
# inputs. Every other difference is refused. A changed optimizer.lr is applied to the restored optimizer
# and schedule (ResumeState); scheduler.num_training_steps follows trainer.max_steps.
SAFE_ON_RESUME = (
    "optimizer.lr",
    "trainer.max_steps",
    "scheduler.num_training_steps",
    "guard.*",
    "checkpoint.*",
    "logger.*",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "callbacks.progress_bar.*",
    "callbacks.lr_monitor.*",
    "callbacks.model_checkpoint.every_n_train_steps",
    "export",  # what ships and how it is scored: written after training (resume=auto exports without training again)
    "export_options.*",
    "eval.exports",
    "eval.packed",
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temp file + os.replace; torch.load with weights_only=True."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_load(path, map_location)


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load that refuses pickled code: only tensors, numbers, strings and containers load."""
    require(Path(path).is_file(), f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise QatlabError(
            f"'{path}' holds pickled objects beyond tensors and plain data, so qatlab will not load it "
            f"({str(e).splitlines()[0]}); only load checkpoints qatlab wrote"
        ) from None
    except RuntimeError as e:  # a truncated or foreign file: torch's zip reader fails
        raise QatlabError(f"'{path}' is not a readable checkpoint ({str(e).splitlines()[0]})") from None


# ---- which config a run is ---------------------------------------------------------------------


def config_identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus where-it-writes keys; every path under `paths` becomes a placeholder."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key in list(cfg.get("paths") or {}):
            cfg.paths[key] = f"<paths.{key}>"  # so ${paths.output_dir}/checkpoints etc. compare equal
        identity = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_IDENTITY:
        identity.pop(key, None)
    return identity


def config_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_hash(identity: dict[str, Any]) -> str:
    """The hash a checkpoint carries: the identity without the keys a resume may change."""
    flat = _flat(json.loads(json.dumps(identity, default=str)))
    return config_hash({k: v for k, v in flat.items() if not safe_on_resume(k)})


def safe_on_resume(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in SAFE_ON_RESUME)


def write_run_file(run_dir: str | Path, identity: dict[str, Any]) -> None:
    text = json.dumps({"config_hash": config_hash(identity), "config": identity}, indent=1, default=str)
    atomic_write_text(Path(run_dir) / RUN_FILE, text)


def recorded_differences(run_dir: Path, identity: dict[str, Any]) -> list[str] | None:
    """The keys whose values differ from the run file's ([] for the same config), None without a run file."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QatlabError(f"'{path}' is not a readable run file ({e}); it is written atomically, so something "
                          "else changed it: delete it to start over in that dir, or use another hydra.run.dir") from None
    if recorded.get("config_hash") == config_hash(identity):
        return []
    then, now = _flat(recorded.get("config", {})), _flat(json.loads(json.dumps(identity, default=str)))
    return [k for k in sorted(set(then) | set(now)) if then.get(k, _UNSET) != now.get(k, _UNSET)] or ["<config>"]


def check_same_config(run_dir: Path, identity: dict[str, Any]) -> list[str]:
    """Refuse to resume a run that another config started (no run file: nothing to compare, allowed).
    Differences in SAFE_ON_RESUME keys are allowed: logged, and returned as 'key=old there, new now'."""
    keys = recorded_differences(run_dir, identity)
    if not keys:
        return []
    then, now = _recorded_flat(run_dir), _flat(json.loads(json.dumps(identity, default=str)))
    refused = [k for k in keys if not safe_on_resume(k)]
    if refused:
        raise QatlabError(
            f"resume: the run in '{run_dir}' was made by another config ({'; '.join(describe(refused, then, now))}); "
            "resume it with the same overrides, or start a new run (resume=null, or another hydra.run.dir). "
            f"A resume may change only {', '.join(SAFE_ON_RESUME)}"
        )
    allowed = describe(keys, then, now, limit=None)
    log.warning("resume: changed since the run started, allowed on resume: %s", "; ".join(allowed))
    return allowed


def check_fresh_run_dir(run_dir: Path, identity: dict[str, Any]) -> None:
    """A fresh run (resume=null) may reuse a dir only if the run in it had the same config."""
    keys = recorded_differences(run_dir, identity)
    if not keys:
        if keys == [] and (run_dir / "checkpoints" / LAST).is_file():
            log.warning("a fresh run (resume=null) in %s, which holds a checkpoint of this same config: it starts "
                        "from step 0 and replaces that checkpoint (resume=auto would continue from it)", run_dir)
        return
    then, now = _recorded_flat(run_dir), _flat(json.loads(json.dumps(identity, default=str)))
    hint = ("continue it with resume=auto (the keys that differ may change on resume)"
            if all(safe_on_resume(k) for k in keys) else "continue that run with its own overrides and resume=auto")
    raise QatlabError(
        f"paths.output_dir='{run_dir}' holds a run of another config ({'; '.join(describe(keys, then, now))}); "
        f"a fresh run there would overwrite its {RUN_FILE} and checkpoints and neither could resume: pass a new "
        f"hydra.run.dir (or paths.output_dir) for this run, or {hint}"
    )


def describe(keys: list[str], then: dict[str, Any], now: dict[str, Any], limit: int | None = 5) -> list[str]:
    out = [f"{k}={then.get(k, '<unset>')!r} there, {now.get(k, '<unset>')!r} now" for k in keys]
    return out if limit is None or len(out) <= limit else [*out[:limit], f"and {len(out) - limit} more"]


def differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return describe([k for k in sorted(set(then) | set(now)) if then.get(k, _UNSET) != now.get(k, _UNSET)],
                    then, now, limit=None)


_UNSET = object()


def _recorded_flat(run_dir: Path) -> dict[str, Any]:
    return _flat(json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8")).get("config", {}))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


# ---- where a resume starts ---------------------------------------------------------------------


@dataclass(frozen=True)
class ResumeFrom:
    run_dir: Path  # the run being continued (its qatlab_run.json, LKD progress, checkpoints)
    checkpoint: Path | None  # the Lightning checkpoint to restore; None: nothing saved yet


def find_resume(value: str | None, output_dir: str | Path) -> ResumeFrom | None:
    """resume=null -> None; auto -> this run dir; a run dir -> its last.ckpt; a .ckpt file -> that file."""
    if not value:
        return None
    if str(value) == "auto":
        run_dir = Path(output_dir)
        return ResumeFrom(run_dir, _existing(run_dir / "checkpoints" / LAST))
    path = Path(str(value)).expanduser()
    require(path.exists(), f"resume='{value}' does not exist; give a run dir, a .ckpt file, or resume=auto")
    if path.is_dir():
        require(
            (path / RUN_FILE).is_file() or (path / "checkpoints" / LAST).is_file(),
            f"resume='{value}' holds no qatlab run (no {RUN_FILE}, no checkpoints/{LAST}); give a run dir or a .ckpt file",
        )
        return ResumeFrom(path, _existing(path / "checkpoints" / LAST))
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return ResumeFrom(run_dir, path)


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None
