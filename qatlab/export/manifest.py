"""The packed checkpoint's files and its JSON manifest (one schema for every method).

A packed export is a folder:
  config.json        the HF model config (the loader rebuilds the architecture from it)
  model.safetensors  packed layers plus every other tensor (embeddings, norms, an untied lm_head)
  qatlab.json        this manifest

Manifest keys:
  format          FORMAT (bump when the layout changes; the loader refuses other formats)
  qatlab_version  the qatlab that wrote it
  method          the method's name; facts: its describe() (bits, group size, ...)
  dtype           floating tensors' storage dtype (scales, g/h, embeddings, norms)
  layers          {layer name: entry}; entry["kind"] is
                    "int"    codes packed in "L.qweight" (int32), "L.scales", "L.zeros" (asymmetric int
                             grids, uint8); entry: shape [out, in], weight (QuantConfig keys), act
                    "onebit" signs packed 32 per int32 in "L.qweight", "L.g", "L.h", "L.norm.*";
                             entry: shape, norm_affine, norm_eps
                    "dense"  a FakeQuantLinear without a weight quantizer: "L.weight" as is, act
                  every layer keeps "L.bias" when it has one
  kv              the K/V quantizer (QuantConfig keys) or null; the loader re-applies it
  tied            {key: source key} of tied tensors, stored once
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

import qatlab
from qatlab.errors import require
from qatlab.quant.config import QuantConfig

FORMAT = "qatlab-packed-v1"
WEIGHTS = "model.safetensors"
MANIFEST = "qatlab.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def config_to_dict(cfg: QuantConfig | None) -> dict[str, Any] | None:
    return None if cfg is None else dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any] | None) -> QuantConfig | None:
    return None if d is None else QuantConfig(**d)


def check_dtype(dtype: str) -> torch.dtype:
    require(dtype in DTYPES, f"export dtype '{dtype}' is not known; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def write_manifest(path: Path, **fields: Any) -> None:
    manifest = {"format": FORMAT, "qatlab_version": qatlab.__version__, **fields}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    require((path / MANIFEST).is_file(),
            f"'{path}' has no {MANIFEST}; pass the folder a packed export wrote (<run dir>/export)")
    manifest = json.loads((path / MANIFEST).read_text())
    require(manifest.get("format") == FORMAT,
            f"'{path}' is format {manifest.get('format')!r}, not {FORMAT}; re-export it with this qatlab")
    return manifest
