"""export_hf: a plain transformers folder of the dequantized weights the student computes with.

Every quantized layer's weight is replaced by its quantizer's values (`layer.encode().dequantize()`, exactly what
the forward pass used), the model is written with save_pretrained in `dtype` (float32: the student's values bit
for bit; float16/bfloat16: each weight rounded once), with the tokenizer and a model card (README.md) stating
method, bits and PPL, so any HF-compatible tool evaluates what was trained. No packing: the folder is as large as
the dense model. GPT-2's Conv1D layers get their (in, out) weight back.

What a dense folder cannot hold is refused by `check_hf` before anything is written: OneBit layers (a LayerNorm
after the sign matmul) and activation or K/V quantization, which a plain from_pretrained would run in float
(weights_only=True ships the weights anyway and the card says the activations are not quantized).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatlab.export.manifest import check_dtype
from qatlab.export.survey import Survey, refuse
from qatlab.export.writer import untied_state
from qatlab.layers.fake_linear import FakeQuantLinear


def check_hf(survey: Survey, weights_only: bool = False) -> None:
    """Refuse (one line, before writing) what a dense HF folder would silently compute differently."""
    for name, layer in survey.onebit.items():
        refuse(f"hf: layer '{name}' is a OneBit layer (sign matmul, g, h, then a LayerNorm): no nn.Linear computes it, "
               "so it has no dense HF form; ship it with export=packed")
    if weights_only:
        return
    for name, act in survey.activations.items():
        refuse(f"hf: layer '{name}' quantizes its inputs ({act.describe()}), which a dense HF folder would run in "
               "float; export compressed_tensors (it carries 8-bit per-token activations), or set "
               "export_options.weights_only=true to ship the weights only (the model card then says so)")
    if survey.kv is not None:
        refuse(f"hf: the student quantizes its K/V cache ({survey.kv.describe()}), which a dense HF folder would run "
               "in float; set export_options.weights_only=true to ship the weights only (the model card then says so)")


@torch.no_grad()
def export_hf(student: nn.Module, path: str | Path, facts: dict[str, Any] | None = None, tokenizer: Any = None,
              dtype: str = "float32", card: str | None = None) -> Path:
    """Write folder `path`: config.json, model.safetensors, the tokenizer, README.md, qatlab_manifest.json."""
    path = Path(path)
    torch_dtype = check_dtype(dtype)
    state, _ = untied_state(student.state_dict())  # tied weights (lm_head) are written once, retied on load
    conv1d = conv1d_layers(student)
    for name, module in student.named_modules():
        if isinstance(module, FakeQuantLinear):
            qw = module.encode()
            weight = module.weight if qw is None else qw.dequantize()
            state[f"{name}.weight"] = weight.t() if name in conv1d else weight
            for key in [k for k in state if k.startswith((f"{name}.weight_quantizer.", f"{name}.input_quantizer."))]:
                del state[key]
    state = {k: (v.detach().to(torch_dtype) if v.is_floating_point() else v.detach()).contiguous() for k, v in state.items()}
    student.save_pretrained(path, state_dict=state)
    config = json.loads((path / "config.json").read_text())
    config["dtype"] = dtype
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return write_sidecars(path, tokenizer, facts, card)


def write_sidecars(path: Path, tokenizer: Any, facts: dict[str, Any] | None, card: str | None) -> Path:
    """What every HF-style export folder carries beside its weights: tokenizer, qatlab_manifest.json, README.md."""
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    (path / "qatlab_manifest.json").write_text(json.dumps(facts or {}, indent=2, default=str))
    if card:
        (path / "README.md").write_text(card)
    return path


def conv1d_layers(model: nn.Module) -> set[str]:
    """Names of the layers the architecture builds as GPT-2 Conv1D (weight (in, out)), from a meta-device copy."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    if getattr(model.config, "model_type", None) not in ("gpt2", "gpt_bigcode", "openai-gpt"):
        return set()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    return {n for n, m in skeleton.named_modules() if isinstance(m, Conv1D)}
