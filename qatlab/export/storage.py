"""Stored size of a packed checkpoint against the bf16 model it came from (bits per weight, all included)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from qatlab.export.manifest import WEIGHTS, read_manifest

_BYTES = {"U8": 1, "I8": 1, "I16": 2, "I32": 4, "F16": 2, "BF16": 2, "F32": 4, "I64": 8, "F64": 8, "BOOL": 1}
# What a packed layer stores in place of its weight (its bias counts as an ordinary tensor).
_PACKED_PARTS = ("qweight", "scales", "zeros", "g", "h", "norm.")


def storage_report(path: str | Path) -> dict[str, float]:
    """File size, compression and bits per weight of the export in folder `path`.

    params counts the original model's weights once (tied ones once): out * in per packed layer plus
    every stored tensor that is not part of a packed layer. bits_per_weight_linear: the packed layers'
    bytes (codes, scales, zeros; OneBit: signs, g, h, norm) per weight they replace, bias excluded.
    """
    path = Path(path)
    layers = {n: e for n, e in read_manifest(path)["layers"].items() if e["kind"] != "dense"}
    parts = tuple(f"{n}.{part}" for n in layers for part in _PACKED_PARTS)
    linear_weights = sum(o * i for o, i in (e["shape"] for e in layers.values()))
    params, layer_bytes, tensor_bytes = linear_weights, 0, 0
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            numel = int(torch.Size(sl.get_shape()).numel())
            size = numel * _BYTES[sl.get_dtype()]
            tensor_bytes += size
            if key.startswith(parts):
                layer_bytes += size
            else:
                params += numel
    file_bytes = (path / WEIGHTS).stat().st_size
    return {
        "params": params,
        "file_bytes": file_bytes,
        "bf16_bytes": 2 * params,
        "compression_vs_bf16": 2 * params / file_bytes,
        "bits_per_weight_all": 8 * file_bytes / params,
        "bits_per_weight_linear": 8 * layer_bytes / linear_weights if linear_weights else 16.0,
        "header_bytes": file_bytes - tensor_bytes,
    }
