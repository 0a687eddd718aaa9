"""Shipping a student: the export formats `export=` chooses, each checked before anything is written.

  packed              qatlab's own (every method, bit for bit; qatlab.export.load_packed)   <dir>/
  hf                  dense save_pretrained folder of the dequantized weights              <dir>/hf/
  compressed_tensors  pack-quantized codes + quantization_config (transformers, vLLM)      <dir>/compressed_tensors/
  gguf                Q4_0 / Q4_1 / Q8_0 / TQ1_0 / TQ2_0 blocks of the codes (llama.cpp)   <dir>/gguf/model.gguf

`plan(options, student)` asks every chosen format whether it can hold the student exactly and raises a one-line
QatlabError (layer, grid, nearest exact training grid) before any file exists; `write(...)` then writes them;
`load(fmt, path)` reloads one with its real consumer (transformers for hf, transformers + compressed-tensors,
transformers' GGUF reader, which dequantizes with the gguf package), for `eval.exports`.
The packed export stays at the folder's root (where `export=true` has always put it); the others are subfolders.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatlab.errors import QatlabError, require
from qatlab.export.card import model_card
from qatlab.export.compressed_tensors import check_compressed_tensors, export_compressed_tensors
from qatlab.export.gguf import GGUF_FILE, TYPES, check_gguf, export_gguf
from qatlab.export.hf import check_hf, export_hf
from qatlab.export.loader import load_packed
from qatlab.export.manifest import DTYPES
from qatlab.export.survey import Survey
from qatlab.export.writer import export_packed

FORMATS = ("packed", "hf", "compressed_tensors", "gguf")


@dataclass(frozen=True)
class ExportOptions:
    formats: tuple[str, ...] = ()
    dtype: str = "float16"  # floating tensors: scales, embeddings, norms (float32: the student's values exactly)
    gguf_type: str = "auto"  # auto (the smallest exact type per layer) or one of gguf.TYPES for every layer
    weights_only: bool = False  # ship the weights of a student that also quantizes activations / K/V (card says so)

    def __post_init__(self) -> None:
        for fmt in self.formats:
            require(fmt in FORMATS, f"export={fmt!r} is not a format; use one or a list of {', '.join(FORMATS)} "
                                    "(e.g. export=[hf,gguf]), true (= packed) or false")
        require(len(set(self.formats)) == len(self.formats), f"export={list(self.formats)} names a format twice")
        require(self.dtype in DTYPES, f"export_options.dtype={self.dtype!r} is not known; use one of {list(DTYPES)}")
        require(self.gguf_type in ("auto", *TYPES),
                f"export_options.gguf_type={self.gguf_type!r} is not known; use auto or one of {', '.join(TYPES)}")
        require(isinstance(self.weights_only, bool),
                f"export_options.weights_only={self.weights_only!r} must be true or false")


def parse_formats(value: Any) -> tuple[str, ...]:
    """`export=` as given: false/null/[] (none), true (packed, the old switch), a name, or a list of names."""
    if value is None or value is False:
        return ()
    if value is True:
        return ("packed",)
    if isinstance(value, str):
        return (value,)
    require(all(isinstance(v, str) for v in value), f"export={list(value)!r}: give format names ({', '.join(FORMATS)})")
    return tuple(value)


def options_from(cfg: Any) -> ExportOptions:
    """ExportOptions from a run config (keys `export` and `export_options`)."""
    extra = dict(cfg.get("export_options") or {})
    unknown = sorted(set(extra) - {"dtype", "gguf_type", "weights_only"})
    require(not unknown, f"export_options.{unknown[0] if unknown else ''} is not a key; use dtype, gguf_type, weights_only")
    return ExportOptions(parse_formats(cfg.get("export")), **extra)


def scored(options: ExportOptions, exports: Any, packed: Any = False) -> list[str]:
    """The formats `eval.exports` scores (true: every one written; a name or a list), plus packed for the old
    `eval.packed=true`; each must be one `export=` writes."""
    chosen = list(options.formats) if exports is True else list(parse_formats(exports or None))
    if packed and "packed" not in chosen:
        chosen.insert(0, "packed")
    for fmt in chosen:
        require(fmt in options.formats, f"eval.exports names {fmt!r}" + (" (eval.packed=true)" if fmt == "packed" and packed else "")
                + f", which export={list(options.formats)} does not write; add it to export (e.g. export=[{','.join([*options.formats, fmt])}])")
    return [f for f in FORMATS if f in chosen]


def subdir(fmt: str) -> str:
    return "" if fmt == "packed" else fmt


def plan(options: ExportOptions, student: nn.Module) -> dict[str, Any]:
    """{format: what its writer needs}, or a QatlabError naming the first layer a format cannot hold exactly."""
    if not options.formats:
        return {}
    survey = Survey.of(student)
    plans: dict[str, Any] = {}
    for fmt in options.formats:
        if fmt == "hf":
            check_hf(survey, options.weights_only)
            plans[fmt] = survey
        elif fmt == "compressed_tensors":
            plans[fmt] = check_compressed_tensors(student, survey, options.weights_only)
        elif fmt == "gguf":
            plans[fmt] = check_gguf(student, survey, options.gguf_type, options.weights_only)
        else:
            plans[fmt] = None  # packed holds every method's layers
    return plans


@torch.no_grad()
def write(options: ExportOptions, plans: dict[str, Any], student: nn.Module, folder: Path, *, method: str = "",
          facts: dict[str, Any] | None = None, kv: Any = None, kv_placement: Any = None, tokenizer: Any = None,
          card_results: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write every planned format under `folder`; returns {format: its path}. card_results: the run's numbers
    for each folder's model card (README.md)."""
    folder = Path(folder)
    note = Survey.of(student).weights_only_note() if options.weights_only else ""
    written = {}
    for fmt in options.formats:
        card = model_card(fmt, {**(facts or {}), **(card_results or {})}, note)
        path = folder / subdir(fmt)
        path.mkdir(parents=True, exist_ok=True)
        if fmt == "packed":
            export_packed(student, path, dtype=options.dtype, method=method, facts=facts, kv=kv, kv_placement=kv_placement)
        elif fmt == "hf":
            export_hf(student, path, facts, tokenizer, options.dtype, card)
        elif fmt == "compressed_tensors":
            export_compressed_tensors(student, path, plans[fmt], tokenizer, options.dtype, facts, card)
        else:
            export_gguf(student, path, plans[fmt], tokenizer, options.dtype, name=f"qatlab {method}".strip(), card=card)
        written[fmt] = path
    return written


def load(fmt: str, path: str | Path, dtype: str = "float32") -> nn.Module:
    """The export in `path` as its consumer loads it, eval mode (for scoring what ships)."""
    from transformers import AutoModelForCausalLM

    path, torch_dtype = Path(path), DTYPES[dtype]
    if fmt == "packed":
        return load_packed(path, dtype=dtype)
    if fmt == "hf":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).eval()
    if fmt == "compressed_tensors":
        return load_compressed_tensors(path, torch_dtype)
    if fmt == "gguf":  # transformers' GGUF reader: the gguf package's dequantizer, q/k rows un-permuted
        return AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=torch_dtype).eval()
    raise QatlabError(f"export format {fmt!r} is not known; use one of {', '.join(FORMATS)}")


def load_compressed_tensors(path: Path, dtype: torch.dtype) -> nn.Module:
    """transformers + compressed-tensors. Asymmetric pack-quantized checkpoints go through dequantize=True
    (compressed-tensors' own decompressor at load time): with transformers 5.24 / compressed-tensors 0.20 the
    compressed route builds the model's zero points unpacked (out, G) on the meta device and then refuses the
    checkpoint's packed (ceil(out * b / 32), G) ones, the layout compressed-tensors' own compressor writes."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    groups = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"].values()
    asymmetric = any(not g["weights"]["symmetric"] and g["format"] == "pack-quantized" for g in groups)
    if not asymmetric:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with warnings.catch_warnings():  # "the quantization_config from the model will be used": only dequantize differs
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        config = CompressedTensorsConfig(dequantize=True)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=config).eval()
