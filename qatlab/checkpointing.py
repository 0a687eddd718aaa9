"""Checkpoints that survive kills and load without running pickled code, and which run a resume continues.

- AtomicCheckpointIO: Lightning writes every checkpoint to a temp name and renames it (qatlab.atomic),
  and reads it back with torch.load(weights_only=True): plain tensors and containers only.
- The run file `<run dir>/qatlab_run.json` records the config a run was started with; a resume from
  that dir with another config is refused, naming the keys that differ. Paths are not part of the
  config's identity: the same run may be resumed from another folder or with another cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from qatlab.atomic import atomic_path, atomic_write_text
from qatlab.errors import QatlabError, require

RUN_FILE = "qatlab_run.json"
LAST = "last.ckpt"
# Top-level keys that say where a run writes or how it starts, not what it computes.
NOT_IDENTITY = ("resume", "paths", "results_file", "sweep_continue_on_error")


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


def write_run_file(run_dir: str | Path, identity: dict[str, Any]) -> None:
    text = json.dumps({"config_hash": config_hash(identity), "config": identity}, indent=1, default=str)
    atomic_write_text(Path(run_dir) / RUN_FILE, text)


def check_same_config(run_dir: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume a run that another config started (no run file: nothing to compare, allowed)."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return
    recorded = json.loads(path.read_text(encoding="utf-8"))
    if recorded.get("config_hash") == config_hash(identity):
        return
    diffs = differences(_flat(recorded.get("config", {})), _flat(json.loads(json.dumps(identity, default=str))))
    raise QatlabError(
        f"resume: the run in '{run_dir}' was made by another config ({'; '.join(diffs[:5]) or 'different keys'}); "
        "resume it with the same overrides, or start a new run (resume=null, or another hydra.run.dir)"
    )


def differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [f"{k}={then.get(k, '<unset>')!r} there, {now.get(k, '<unset>')!r} now"
            for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]


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
