"""Teacher top-k logit cache: run the teacher over the train blocks once, train from its top-k later.

Layout under <cache_dir>/teacher_topk/<key>/ (key = hash of teacher, tokenizer, blocks, k, dtype):
    manifest.json              what the cache holds (checked on reuse)
    shard_00000.safetensors    blocks [0, shard_size): indices (n, T, k) int32, logprobs (n, T, k)
    shard_00001.safetensors    in `dtype`, log_rest (n, T) float32 (log mass of the other tokens)
Each shard is written to a temp file and renamed into place, so a killed build leaves only whole
shards and resumes where it stopped. Each shard carries the SHA-256 of its data (qatlab.data.shards):
opening the cache checks every shard's size and checksum; a build deletes a damaged shard (a warning
names it) and makes it again, a plain reader refuses it naming the file. Several processes may build the same cache at once: each
makes its own share of the shards first (i % world == rank), then any shard still missing.

The losses on top of it and their approximation: qatlab/losses/topk.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from qatlab.atomic import atomic_write_text
from qatlab.data.generation import model_identity, tensor_digest
from qatlab.data.shards import damaged, drop_if_damaged, save_checked
from qatlab.errors import QatlabError, require
from qatlab.losses.topk import CachedTeacherOutput, TopKLogits, topk_from_logits

log = logging.getLogger("qatlab")

MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Batch keys the cached dataset adds next to input_ids / attention_mask.
KEYS = ("teacher_topk_indices", "teacher_topk_logprobs", "teacher_log_rest")


def cache_info(teacher, tokenizer, blocks: torch.Tensor, k: int, dtype: str, shard_size: int) -> dict[str, Any]:
    """Everything that decides the cache's content: the key is a hash of this."""
    require(dtype in DTYPES, f"teacher_cache.dtype='{dtype}' is not known; use one of {sorted(DTYPES)}")
    require(k >= 1 and shard_size >= 1, f"teacher_cache.k={k} and shard_size={shard_size} must be >= 1")
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "teacher": model_identity(teacher),
        "tokenizer": f"{getattr(tokenizer, 'name_or_path', '')}|{hashlib.sha1(vocab.encode()).hexdigest()[:16]}",
        "blocks": tensor_digest(blocks),
        "num_blocks": len(blocks),
        "block_size": blocks.shape[1],
        "k": k,
        "dtype": dtype,
        "shard_size": shard_size,
    }


def cache_dir_for(root: str | Path, info: Mapping[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / "teacher_topk" / f"k{info['k']}-{digest}"


# ---- building ------------------------------------------------------------------------------------


def build_logit_cache(teacher, blocks: torch.Tensor, out: str | Path, info: Mapping[str, Any],
                      batch_size: int = 8, device: torch.device | None = None) -> LogitCache:
    """Write the missing shards of the cache described by `info` under `out`; return a reader."""
    out = Path(out)
    _write_manifest(out, dict(info))
    for i in range(_num_shards(info)):  # a truncated or corrupted shard is made again
        drop_if_damaged(_shard_path(out, i), "teacher cache")
    missing = [i for i in _shard_order(_num_shards(info)) if not _shard_path(out, i).is_file()]
    if missing:
        device = device or _default_device()
        home = next(teacher.parameters()).device
        teacher.to(device)
        try:
            for i in missing:
                if not _shard_path(out, i).is_file():  # another process may have made it meanwhile
                    _build_shard(teacher, blocks, out, info, i, batch_size, device)
        finally:
            teacher.to(home)
    return LogitCache(out, verified=True)


@torch.no_grad()
def _build_shard(teacher, blocks, out: Path, info, i: int, batch_size: int, device) -> None:
    rows = blocks[i * info["shard_size"] : (i + 1) * info["shard_size"]]
    parts = []
    for j in range(0, len(rows), batch_size):
        ids = rows[j : j + batch_size].to(device)
        logits = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (b, T, V)
        parts.append(topk_from_logits(logits, info["k"]).to("cpu"))
    tensors = {
        "indices": torch.cat([p.indices for p in parts]).to(torch.int32),
        "logprobs": torch.cat([p.logprobs for p in parts]).to(DTYPES[info["dtype"]]),
        "log_rest": torch.cat([p.log_rest for p in parts]).float(),
    }
    save_checked(tensors, _shard_path(out, i))
    log.info("teacher cache: wrote shard %d (%d blocks) in %s", i, len(rows), out)


def _shard_order(n: int) -> list[int]:
    """This process's share first (i % world == rank), then the rest."""
    rank, world = _rank_and_world()
    mine = list(range(rank, n, world))
    return mine + [i for i in range(n) if i not in set(mine)]


def _rank_and_world() -> tuple[int, int]:
    """From the launcher's environment (torchrun, SLURM); (0, 1) in a single process."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", env.get("LOCAL_RANK", 0))))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    return rank % max(world, 1), max(world, 1)


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _write_manifest(out: Path, info: dict) -> None:
    """Create the manifest, or check that the existing one describes the same cache."""
    path = out / MANIFEST
    if path.is_file():
        old = _read_manifest(path)
        require(old == info, f"{out} holds a teacher cache made with other settings ({MANIFEST} differs); "
                             "delete that folder or use another teacher_cache.dir")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(info, indent=2, sort_keys=True))


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QatlabError(f"teacher cache manifest '{path}' is not readable JSON ({e}); delete the folder "
                          f"{path.parent} so the next run builds the cache again") from None


def _num_shards(info: Mapping[str, Any]) -> int:
    return -(-info["num_blocks"] // info["shard_size"])


def _shard_path(out: Path, i: int) -> Path:
    return out / f"shard_{i:05d}.safetensors"


# ---- reading -------------------------------------------------------------------------------------


class LogitCache:
    """Random access to the cached top-k of block i; keeps the last shard it read in memory.
    Opening checks every shard's size and checksum (verified=True: the builder just did)."""

    def __init__(self, folder: str | Path, verified: bool = False):
        self.folder = Path(folder)
        require((self.folder / MANIFEST).is_file(), f"{self.folder} is not a teacher cache (no {MANIFEST})")
        self.info = _read_manifest(self.folder / MANIFEST)
        missing = [i for i in range(_num_shards(self.info)) if not _shard_path(self.folder, i).is_file()]
        require(not missing, f"teacher cache {self.folder} is incomplete (shards {missing[:5]}... missing); "
                             "build it again (python -m qatlab teacher_cache.enabled=true) to finish it")
        for i in [] if verified else range(_num_shards(self.info)):
            problem = damaged(_shard_path(self.folder, i))
            require(problem is None, f"teacher cache shard '{_shard_path(self.folder, i)}' is damaged ({problem}); "
                                     "run the training again with teacher_cache.enabled=true: it makes that shard again")
        self._open: dict[int, Any] = {}  # shard -> safe_open handle: memory-mapped, reads only the rows asked for

    def __len__(self) -> int:
        return self.info["num_blocks"]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """{indices (T, k) int64, logprobs (T, k), log_rest (T,)} of block i, under the batch KEYS."""
        require(0 <= i < len(self), f"block {i} is outside the teacher cache ({len(self)} blocks)")
        shard, row = divmod(i, self.info["shard_size"])
        if shard not in self._open:
            self._open[shard] = safe_open(str(_shard_path(self.folder, shard)), framework="pt")
        f = self._open[shard]
        return {
            KEYS[0]: f.get_slice("indices")[row : row + 1][0].long(),
            KEYS[1]: f.get_slice("logprobs")[row : row + 1][0],
            KEYS[2]: f.get_slice("log_rest")[row : row + 1][0],
        }


class CachedBlockDataset(Dataset):
    """Train blocks with their cached teacher top-k: what the datamodule yields when the cache is on."""

    def __init__(self, blocks: torch.Tensor, cache: LogitCache):
        require(len(blocks) == len(cache) and blocks.shape[1] == cache.info["block_size"],
                f"teacher cache holds {len(cache)} blocks of {cache.info['block_size']} tokens but the train "
                f"split has {len(blocks)} of {blocks.shape[1]}; the cache was built for other data")
        self.blocks, self.cache = blocks, cache

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **self.cache[i]}


def cached_teacher_output(batch: Mapping[str, torch.Tensor]) -> CachedTeacherOutput | None:
    """The teacher's output read from a batch of the cached dataset; None for a plain batch."""
    if KEYS[0] not in batch:
        return None
    return CachedTeacherOutput(TopKLogits(*(batch[key] for key in KEYS)))


# ---- wiring a run --------------------------------------------------------------------------------


def attach_teacher_cache(cfg: Mapping[str, Any] | None, teacher, tokenizer, datamodule, cache_dir: str) -> bool:
    """With teacher_cache.enabled: build (or reuse) the cache of the train blocks and hand it to the
    datamodule, so each train batch carries the teacher's top-k. Returns whether it did."""
    if not cfg or not cfg.get("enabled"):
        return False
    blocks = datamodule.blocks("train")
    info = cache_info(teacher, tokenizer, blocks, int(cfg["k"]), cfg.get("dtype", "float32"),
                      int(cfg.get("shard_size", 256)))
    out = cache_dir_for(cfg.get("dir") or cache_dir, info)
    cache = build_logit_cache(teacher, blocks, out, info, batch_size=int(cfg.get("batch_size", 8)))
    datamodule.set_teacher_cache(cache)
    teacher.cpu()  # training reads the cache: the teacher waits off the accelerator (evaluate() moves it back)
    log.info("teacher cache: top-%d of %d train blocks from %s", info["k"], len(cache), out)
    return True
