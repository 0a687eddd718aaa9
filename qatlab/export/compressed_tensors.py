"""export_compressed_tensors: the student's own codes as a compressed-tensors checkpoint (transformers, vLLM).

compressed-tensors stores an int grid as w = (q - zp) * scale with SIGNED codes q in [-2^(b-1), 2^(b-1) - 1] and
integer zero points; qatlab's grids map onto it without changing a value (qatlab.export.int_form): symmetric
codes (restricted or full range) are already signed, an asymmetric grid's codes 0..2^b-1 and zero z become
q - 2^(b-1) and z - 2^(b-1). With export_options.dtype=float32 the reloaded weights equal the student's bit for bit (the
same fp32 product); float16/bfloat16 round each scale once.

Layout (what the compressors of compressed-tensors 0.20 read), layer L, weight (out, in), G groups per row:
  pack-quantized (weight-only, and weights under 8 bits with 8-bit activations):
    L.weight_packed       (out, ceil(in * b / 32)) int32, q + 2^(b-1) densely packed (qatlab.export.bitpack.pack_dense)
    L.weight_scale        (out, G) export_options.dtype          strategy group (G = in / group_size) or channel (G = 1)
    L.weight_zero_point   (ceil(out * b / 32), G) int32  asymmetric only: zp + 2^(b-1) packed along the rows
    L.weight_shape        (2,) int64 [out, in]
  int-quantized (8-bit weights with 8-bit per-token activations, W8A8):
    L.weight (out, in) int8, L.weight_scale (out, G), L.weight_zero_point (out, G) int8 when asymmetric
config.json carries `quantization_config` (quant_method compressed-tensors, one config group per scheme, format,
quantization_status compressed, ignore: every Linear left in float, lm_head included). Activations: dynamic
per-token int8 (`input_activations`), the only activation scheme written; compressed-tensors computes its own
per-token scale, max|x| / 127.5 (qatlab's: max|x| / 127), so an A8 student's reload is close, not bit-exact
(logits within ~0.5 % on the tiny test Llama); K/V quantization is refused (vLLM's
int K/V cache is not per-token dynamic), unless export_options.weights_only=true.

Serving: vLLM runs 4- and 8-bit weight-only schemes (W4A16/W8A16, group or channel) and W8A8 int8 with per-channel
weights; the other bit widths load in transformers (exactly) but not in vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from qatlab.export.bitpack import pack_dense
from qatlab.export.hf import conv1d_layers, write_sidecars
from qatlab.export.int_form import IntForm, int_form
from qatlab.export.manifest import check_dtype
from qatlab.export.survey import Survey, refuse
from qatlab.export.writer import untied_state
from qatlab.layers.fake_linear import FakeQuantLinear
from qatlab.quantizers.spec import QuantConfig

FORMAT_VERSION = "0.20.0"  # the compressed-tensors release whose schema this writes (and the tests load with)
NEAREST = ("method.weight.grid=int with bits 4 or 8 (symmetric, restricted or full range, or asymmetric), groups "
           "(method.weight.group_size) or per channel (method.weight.granularity=channel)")


@dataclass
class CTLayer:
    form: IntForm
    bits: int  # stored bits (codes fit [-2^(bits-1), 2^(bits-1) - 1])
    act: QuantConfig | None  # per-token input quantizer carried into the checkpoint

    @property
    def scheme(self) -> tuple:
        f = self.form
        return (self.bits, f.zero is None, None if f.per_channel else f.group,
                None if self.act is None else (self.act.bits, self.act.symmetric))

    @property
    def format(self) -> str:
        return "int-quantized" if self.bits == 8 and self.act is not None else "pack-quantized"


def signed_bits(lo: int, hi: int) -> int | None:
    """The fewest bits b (2..8) whose signed range [-2^(b-1), 2^(b-1) - 1] holds codes lo..hi; None if none does."""
    for b in range(2, 9):
        if -(2 ** (b - 1)) <= lo and hi <= 2 ** (b - 1) - 1:
            return b
    return None


def check_compressed_tensors(student: nn.Module, survey: Survey, weights_only: bool = False) -> dict[str, CTLayer]:
    """Each quantized layer's plan, or a one-line refusal naming the layer, its grid and the nearest exact grid."""
    for name in survey.onebit:
        refuse(f"compressed_tensors: layer '{name}' is a OneBit layer (sign matmul, g, h, then a LayerNorm), which no "
               "compressed-tensors scheme computes; ship it with export=packed")
    if survey.kv is not None and not weights_only:
        refuse(f"compressed_tensors: the student quantizes its K/V cache per token ({survey.kv.describe()}); "
               "compressed-tensors' kv_cache_scheme is a static per-tensor scale, so it would not compute the same: "
               "set method.kv=null, or export_options.weights_only=true to ship weights and activations without it")
    conv1d = conv1d_layers(student)
    plan = {}
    for name, qw in survey.weights.items():
        if name in conv1d:
            refuse(f"compressed_tensors: layer '{name}' is a GPT-2 Conv1D, which compressed-tensors does not quantize "
                   "(it targets nn.Linear); export hf or packed for this model")
        form = int_form(qw)
        where = f"compressed_tensors: layer '{name}' ({qw.grid.label}, group {qw.group_size})"
        if isinstance(form, str):
            refuse(f"{where} cannot be stored: {form}; the nearest exact training grid is {NEAREST}")
        if form.zero is None:
            bits = signed_bits(form.lo, form.hi)
            if bits is None:
                refuse(f"{where}: codes {form.lo}..{form.hi} need more than 8 signed bits; use {NEAREST}")
        else:
            bits = qw.grid.bits
            z = form.zero
            if not form.integral_zero() or float(z.min()) < 0 or float(z.max()) > 2**bits - 1:
                refuse(f"{where}: its zero points are not integers in 0..{2**bits - 1} (learned zero points), and "
                       "compressed-tensors stores integer ones; train with integer zero points (quantizer=minmax or "
                       f"lsq), or use {NEAREST}")
        act = survey.activations.get(name)
        if act is not None and not (act.bits == 8 and act.granularity in ("token", "channel") and not act.nf):
            if not weights_only:
                refuse(f"{where} quantizes its inputs with {act.describe()}; compressed-tensors' dynamic activation "
                       "scheme written here is 8-bit per token: set method.activation.bits=8 "
                       "method.activation.granularity=token, or export_options.weights_only=true")
            act = None
        plan[name] = CTLayer(form, bits, act)
    return plan


def weight_args(layer: CTLayer) -> dict[str, Any]:
    f = layer.form
    return {"num_bits": layer.bits, "type": "int", "symmetric": f.zero is None,
            "group_size": None if f.per_channel else f.group, "strategy": "channel" if f.per_channel else "group",
            "dynamic": False}


def act_args(act: QuantConfig | None) -> dict[str, Any] | None:
    if act is None:
        return None
    return {"num_bits": 8, "type": "int", "symmetric": act.symmetric, "group_size": None, "strategy": "token",
            "dynamic": True}


def quantization_config(plan: dict[str, CTLayer], ignore: list[str]) -> dict[str, Any]:
    """config.json's quantization_config: one config group per distinct scheme."""
    schemes: dict[tuple, list[str]] = {}
    for name, layer in plan.items():
        schemes.setdefault(layer.scheme, []).append(name)
    groups = {}
    for i, names in enumerate(schemes.values()):
        first = plan[names[0]]
        targets = ["Linear"] if len(schemes) == 1 else [f"re:^{n.replace('.', chr(92) + '.')}$" for n in names]
        groups[f"group_{i}"] = {"targets": targets, "weights": weight_args(first), "input_activations": act_args(first.act),
                                "output_activations": None, "format": first.format}
    formats = {layer.format for layer in plan.values()}
    return {"config_groups": groups, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": FORMAT_VERSION}


def layer_tensors(layer: CTLayer, dtype: torch.dtype) -> dict[str, Tensor]:
    f, b = layer.form, layer.bits
    offset = 2 ** (b - 1)
    scale = f.scale.to(dtype)
    q = f.q if f.zero is None else f.q - offset  # asymmetric: unsigned codes -> signed
    zero = None if f.zero is None else f.zero.round().to(torch.int64) - offset
    if layer.format == "int-quantized":
        out = {"weight": q.to(torch.int8), "weight_scale": scale}
        if zero is not None:
            out["weight_zero_point"] = zero.to(torch.int8)
        return out
    out = {"weight_packed": pack_dense(q + offset, b), "weight_scale": scale,
           "weight_shape": torch.tensor(list(f.q.shape), dtype=torch.int64)}
    if zero is not None:
        out["weight_zero_point"] = pack_dense((zero + offset).t(), b).t().contiguous()
    return out


@torch.no_grad()
def export_compressed_tensors(student: nn.Module, path: str | Path, plan: dict[str, CTLayer], tokenizer: Any = None,
                              dtype: str = "float16", facts: dict[str, Any] | None = None, card: str | None = None) -> Path:
    """Write folder `path`: config.json (with quantization_config), model.safetensors, tokenizer, README.md."""
    path = Path(path)
    torch_dtype = check_dtype(dtype)
    state, _ = untied_state(student.state_dict())
    for name, module in student.named_modules():
        if isinstance(module, FakeQuantLinear):
            for key in [k for k in state if k.startswith((f"{name}.weight_quantizer.", f"{name}.input_quantizer."))]:
                del state[key]
    tensors = {k: (v.detach().to(torch_dtype) if v.is_floating_point() else v.detach()).contiguous()
               for k, v in state.items()}
    for name, layer in plan.items():
        del tensors[f"{name}.weight"]
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in layer_tensors(layer, torch_dtype).items()})
    linears = [n for n, m in student.named_modules() if isinstance(m, (nn.Linear, FakeQuantLinear))]
    ignore = [n for n in linears if n not in plan]
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = student.config.to_dict()
    config["dtype"] = dtype
    config["quantization_config"] = quantization_config(plan, ignore)
    (path / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if getattr(student, "generation_config", None) is not None:
        student.generation_config.save_pretrained(path)
    return write_sidecars(path, tokenizer, facts, card)
