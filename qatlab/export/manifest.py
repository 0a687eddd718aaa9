"""The packed checkpoint's files, its JSON manifest, and the checks a loader runs on them.

A packed export is a folder:
  config.json        the HF model config, its model_type replaced by a marker ("qatlab-packed: ...load_packed"),
                     so transformers.from_pretrained refuses the folder with a message naming qatlab's loader
                     instead of loading random weights; the real type is kept under "qatlab_model_type"
  model.safetensors  packed layers plus every other tensor (embeddings, norms, an untied lm_head); its header
                     metadata holds a copy of the manifest's layer entries and a sha256 of every tensor
  qatlab.json        this manifest

Manifest keys:
  format          FORMAT (bump when the layout changes; the loader refuses other formats)
  qatlab_version  the qatlab that wrote it
  method          the recipe's name; facts: its describe() (bits, group size, ...)
  dtype           floating tensors' storage dtype (scales, g/h, embeddings, norms)
  layers          {layer name: entry}; entry["kind"] is
                    "codes"  codes packed in "L.qweight" (int32), "L.scales", "L.zeros" (grids with per-group
                             zero points); entry: shape [out, in], group_size, grid (qatlab.quantizers.codes.Grid),
                             quantizer (what produced them), act (the input quantizer's spec)
                    "onebit" signs packed 32 per int32 in "L.qweight", "L.g", "L.h", "L.norm.*";
                             entry: shape, norm_affine, norm_eps
                    "dense"  a FakeQuantLinear without a weight quantizer: "L.weight" as is, act
                  every layer keeps "L.bias" when it has one
  kv              the K/V quantizer (QuantConfig keys) or null; the loader re-applies it
  tied            {key: source key} of tied tensors, stored once
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import qatlab
from qatlab.errors import require
from qatlab.quantizers.codes import Grid
from qatlab.quantizers.spec import QuantConfig

FORMAT = "qatlab-packed-v2"
WEIGHTS = "model.safetensors"
MANIFEST = "qatlab.json"
HF_CONFIG = "config.json"
MODEL_TYPE_MARKER = "qatlab-packed: load this folder with qatlab.export.load_packed(path), not from_pretrained"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REQUIRED = ("format", "dtype", "layers", "kv", "tied")
ENTRY_KEYS = {"codes": ("shape", "group_size", "scale_shape", "grid", "act"), "onebit": ("shape", "norm_affine", "norm_eps"),
              "dense": ("shape", "act")}


def config_to_dict(cfg: QuantConfig | None) -> dict[str, Any] | None:
    return None if cfg is None else cfg.to_dict()


def config_from_dict(d: dict[str, Any] | None) -> QuantConfig | None:
    return None if d is None else QuantConfig(**d)


def grid_to_dict(grid: Grid) -> dict[str, Any]:
    return dataclasses.asdict(grid)


def grid_from_dict(d: dict[str, Any], where: str) -> Grid:
    fields = {f.name for f in dataclasses.fields(Grid)}
    require(isinstance(d, dict) and set(d) == fields,
            f"{where}: grid keys {sorted(d) if isinstance(d, dict) else d!r} are not {sorted(fields)}; re-export it")
    grid = Grid(**d)
    require(grid.kind in ("affine", "codebook") and isinstance(grid.bits, int) and 1 <= grid.bits <= 8
            and grid.qmax - grid.qmin < 2**grid.bits and grid.qmax > grid.qmin,
            f"{where}: grid {d} is not a {d.get('bits')}-bit grid (codes {d.get('qmin')}..{d.get('qmax')} do not fit)")
    return grid


def check_dtype(dtype: str) -> torch.dtype:
    require(dtype in DTYPES, f"export dtype '{dtype}' is not known; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def tensor_digest(t: Tensor) -> str:
    """sha256 of a tensor's bytes (what the loader recomputes to catch a changed or truncated file)."""
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def manifest_fields(**fields: Any) -> dict[str, Any]:
    return {"format": FORMAT, "qatlab_version": qatlab.__version__, **fields}


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))


def header_copy(manifest: dict[str, Any]) -> str:
    """The part of the manifest the loader trusts only if it matches the copy inside the weights file."""
    return json.dumps({k: manifest[k] for k in ("layers", "kv", "tied")}, sort_keys=True)


def write_hf_config(model_config: Any, path: Path) -> None:
    """config.json that transformers refuses (the marker model_type), carrying the real config for load_packed."""
    config = model_config.to_dict()
    config["qatlab_model_type"] = config["model_type"]
    config["model_type"] = MODEL_TYPE_MARKER
    (path / HF_CONFIG).write_text(json.dumps(config, indent=2))


def read_hf_config(path: Path) -> Any:
    from transformers import AutoConfig

    config = json.loads((path / HF_CONFIG).read_text())
    require("qatlab_model_type" in config, f"'{path / HF_CONFIG}' is not a qatlab packed config (no qatlab_model_type)")
    config["model_type"] = config.pop("qatlab_model_type")
    return AutoConfig.for_model(**config)


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    require((path / MANIFEST).is_file(),
            f"'{path}' has no {MANIFEST}; pass the folder a packed export wrote (<run dir>/export)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise qatlab.errors.QatlabError(f"'{path / MANIFEST}' is not valid JSON ({e}); re-export the model") from None
    require(isinstance(manifest, dict) and manifest.get("format") == FORMAT,
            f"'{path}' is format {manifest.get('format') if isinstance(manifest, dict) else None!r}, not {FORMAT}; "
            "re-export it with this qatlab")
    missing = [k for k in REQUIRED if k not in manifest]
    require(not missing, f"'{path / MANIFEST}' lacks key(s) {missing}; re-export the model")
    for name, entry in manifest["layers"].items():
        kind = entry.get("kind") if isinstance(entry, dict) else None
        require(kind in ENTRY_KEYS, f"{MANIFEST}: layer '{name}' has kind {kind!r}; this qatlab knows {sorted(ENTRY_KEYS)}")
        lacking = [k for k in ENTRY_KEYS[kind] if k not in entry]
        require(not lacking, f"{MANIFEST}: layer '{name}' lacks key(s) {lacking}; re-export the model")
    return manifest


def first_difference(a: Any, b: Any, where: str = "") -> str:
    """The first key path where two JSON trees differ (for naming the layer and key a tampered manifest changed)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
        return where
    return f"{where} ({b!r} in {MANIFEST}, {a!r} at export)"
