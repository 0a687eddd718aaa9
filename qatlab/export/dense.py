"""export_dense: a plain transformers folder of the dequantized weights the student computes with.

Every quantized layer's weight is replaced by its quantizer's output (the values the forward pass
used), the model is written with save_pretrained, so any HF-compatible tool evaluates exactly what
was trained. No packing: the file is as large as the full-precision model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatlab.errors import require
from qatlab.layers.fake_linear import FakeQuantLinear
from qatlab.layers.onebit_linear import OneBitLinear


@torch.no_grad()
def export_dense(student: nn.Module, path: str | Path, facts: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    state = student.state_dict()
    for name, module in student.named_modules():
        require(not isinstance(module, OneBitLinear),
                f"layer '{name}' is a OneBit layer (a LayerNorm after the sign matmul): no nn.Linear computes it, so it "
                "has no dense HF form; ship it with the packed export")
        if isinstance(module, FakeQuantLinear):
            state[f"{name}.weight"] = module.quantized_weight().detach()
            for key in [k for k in state if k.startswith(f"{name}.weight_quantizer.") or k.startswith(f"{name}.input_quantizer.")]:
                del state[key]
    student.save_pretrained(path, state_dict=state)
    (path / "qatlab_manifest.json").write_text(json.dumps(facts or {}, indent=2, default=str))
    return path
