"""Safetensors shards that say when they are damaged: size from the header, a checksum of the data.

A cache shard (teacher top-k, teacher-generated samples) is written by `save_checked`: safetensors
with `__metadata__["sha256"]` = the SHA-256 of its data section, in the same atomic write as the
data, so several processes building one cache can never leave a shard and a checksum that disagree.
`damaged(path)` says what is wrong with a file, or None:

- the file is shorter (or longer) than its header says: truncated by a copy, a full disk, a quota;
- the header is not readable JSON;
- the data's SHA-256 differs from the one recorded (bit rot, a partial overwrite).

Shards written before checksums existed are checked for size only. Readers name the file and say to
rerun; builders (qatlab.data.logit_cache, qatlab.data.generation) delete a damaged shard and make it again.
Model weights files (no qatlab checksum) get the size check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save

from qatlab.atomic import atomic_path

log = logging.getLogger("qatlab")

CHECKSUM = "sha256"
_PLACEHOLDER = "0" * 64


def save_checked(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose metadata holds the SHA-256 of its data section (temp file + rename)."""
    blob = bytearray(save({k: v.contiguous() for k, v in tensors.items()},
                          metadata={**(metadata or {}), CHECKSUM: _PLACEHOLDER}))
    (n,) = struct.unpack("<Q", blob[:8])
    digest = hashlib.sha256(memoryview(blob)[8 + n:]).hexdigest()
    marker = f'"{CHECKSUM}":"{_PLACEHOLDER}"'.encode()
    at = blob.find(marker, 8, 8 + n)
    if at < 0:  # safetensors wrote the header differently: fall back to writing it again with the digest
        blob = bytearray(save({k: v.contiguous() for k, v in tensors.items()}, metadata={**(metadata or {}), CHECKSUM: digest}))
    else:
        blob[at:at + len(marker)] = f'"{CHECKSUM}":"{digest}"'.encode()
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)


def damaged(path: str | Path, verify_checksum: bool = True) -> str | None:
    """What is wrong with a safetensors file (missing, truncated, bad header, checksum mismatch), or None if whole."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"truncated: {size} bytes, not even a header"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return f"truncated: {size} bytes, its header alone needs {8 + n}"
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return "its header is not readable"
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            expected = 8 + n + max(ends, default=0)
            if size != expected:
                return f"{'truncated' if size < expected else 'too long'}: {size} bytes, its header says {expected}"
            recorded = (header.get("__metadata__") or {}).get(CHECKSUM)
            if not verify_checksum or recorded is None:
                return None
            digest = hashlib.sha256()
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    except FileNotFoundError:
        return "missing"
    except (OSError, KeyError, TypeError, IndexError, ValueError) as e:
        return f"unreadable ({e})"
    if digest.hexdigest() != recorded:
        return f"checksum mismatch: the data's sha256 is {digest.hexdigest()[:12]}..., its header recorded {recorded[:12]}..."
    return None


def drop_if_damaged(path: Path, what: str) -> bool:
    """Delete a damaged shard (warning with the file and why) so the builder makes it again; True if it was dropped."""
    if not path.is_file():
        return False
    problem = damaged(path)
    if problem is None:
        return False
    log.warning("%s shard %s is damaged (%s): deleting it to make it again", what, path, problem)
    try:
        os.unlink(path)
    except FileNotFoundError:  # another process dropped it first
        pass
    return True
