"""OneBit packed export: signs 8 per byte plus everything else, and the loader that rebuilds the model.

export_onebit(student, path) writes a folder:
  config.json          the HF model config (rebuilds the architecture, no modeling code of ours)
  onebit.safetensors   for each OneBit layer L: "L.sign_packed" (out, ceil(in / 8)) uint8 instead of
                       the latent "L.weight"; "L.g", "L.h", "L.norm.*", "L.bias" as in the student's
                       state_dict; every other tensor (embeddings, norms, an untied lm_head) as is.
                       Floating tensors are stored in `dtype` (float16 by default, as in the paper).
  onebit.json          manifest: layers {name: [out, in]}, layer options, tied keys, dtype, method facts

load_onebit(path) builds the architecture from config.json, swaps the same layers for OneBitLinear
holding the unpacked ±1 signs (frozen), and loads the rest. With dtype=float32 on export it gives
the fake-quant student's logits exactly; float16 storage rounds g, h and the other weights once.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from qatlab.errors import require
from qatlab.quant.onebit_linear import OneBitLinear
from qatlab.quant.sign_pack import pack_signs, unpack_signs
from qatlab.quant.swap import swap_linears

FORMAT = "qatlab-onebit-v1"
WEIGHTS = "onebit.safetensors"
MANIFEST = "onebit.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BYTES = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "I64": 8, "F64": 8, "BOOL": 1}


def onebit_layers(model: nn.Module) -> dict[str, OneBitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, OneBitLinear)}


@torch.no_grad()
def export_onebit(student: PreTrainedModel, path: str | Path, dtype: str = "float16",
                  facts: dict[str, Any] | None = None) -> Path:
    """Write the packed model into folder `path` (created); returns it."""
    require(dtype in DTYPES, f"export dtype '{dtype}' is not known; use one of {sorted(DTYPES)}")
    layers = onebit_layers(student)
    require(bool(layers), "the model has no OneBit layers to pack; export the student of method=onebit")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state, tied = _untied_state(student.state_dict())
    for name, layer in layers.items():
        del state[f"{name}.weight"]  # the latent weight: only its signs ship
        state[f"{name}.sign_packed"] = pack_signs(layer.weight.detach())
    state = {k: _stored(v, DTYPES[dtype]) for k, v in state.items()}
    save_file(state, str(path / WEIGHTS))
    student.config.save_pretrained(path)
    first = next(iter(layers.values()))
    manifest = {
        "format": FORMAT,
        "dtype": dtype,
        "layers": {name: [m.out_features, m.in_features] for name, m in layers.items()},
        "norm_affine": first.norm.elementwise_affine,
        "norm_eps": first.norm.eps,
        "tied": tied,
        "method": facts or {},
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path


def _untied_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop keys whose tensor is another key's (tied weights: safetensors stores each tensor once)."""
    kept: dict[tuple, str] = {}
    out, tied = {}, {}
    for key, tensor in state.items():
        ident = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and ident in kept:
            tied[key] = kept[ident]
            continue
        kept[ident] = key
        out[key] = tensor
    return out, tied


def _stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach().to("cpu")
    return (t.to(dtype) if t.is_floating_point() else t).contiguous()


@torch.no_grad()
def load_onebit(path: str | Path, dtype: str | None = None, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Rebuild the packed model in folder `path`: eval mode, no gradients; dtype defaults to the stored one."""
    path = Path(path)
    require((path / MANIFEST).is_file(), f"'{path}' has no {MANIFEST}; pass the folder export_onebit wrote")
    manifest = json.loads((path / MANIFEST).read_text())
    require(manifest.get("format") == FORMAT, f"'{path}' is not a {FORMAT} export (format={manifest.get('format')!r})")
    dtype = dtype or manifest["dtype"]
    require(dtype in DTYPES, f"dtype '{dtype}' is not known; use one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).to(torch_dtype)
    state = _read(path / WEIGHTS, torch_dtype)
    layers: dict[str, list[int]] = manifest["layers"]

    def make(name: str, linear: nn.Linear) -> OneBitLinear:
        out_features, in_features = layers[name]
        signs = unpack_signs(state.pop(f"{name}.sign_packed"), in_features, torch_dtype)  # (out, in)
        require(signs.shape == (out_features, in_features), f"layer '{name}': packed signs do not fit {layers[name]}")
        weight = nn.Parameter(signs, requires_grad=False)
        return OneBitLinear(weight, linear.bias, norm_affine=manifest["norm_affine"], norm_eps=manifest["norm_eps"])

    swapped = swap_linears(model, make, include=[f"^{re.escape(n)}$" for n in layers], exclude=())
    require(sorted(swapped) == sorted(layers),
            f"the rebuilt {type(model).__name__} has layers {sorted(set(layers) - set(swapped))[:3]} missing; "
            "load with the transformers version that exported it")
    for key, source in manifest["tied"].items():
        state[key] = state[source]
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected_missing = {f"{n}.weight" for n in layers}  # the signs, set above
    require(not unexpected and set(missing) == expected_missing,
            f"export and model disagree: unexpected {unexpected[:3]}, missing {sorted(set(missing) - expected_missing)[:3]}")
    return model.to(device).eval().requires_grad_(False)


def _read(file: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


def layer_storage_bits(out_features: int, in_features: int, norm_affine: bool, float_bits: int = 16) -> int:
    """Bits one OneBit layer stores without its bias: packed signs (rows padded to whole bytes), g, h, norm."""
    vectors = in_features + out_features + (2 * out_features if norm_affine else 0)
    return out_features * 8 * math.ceil(in_features / 8) + float_bits * vectors


def storage_report(path: str | Path) -> dict[str, float]:
    """Stored size of an export against the bf16 model it came from; bits per weight, all included.

    params counts the original model's weights once (tied ones once): out * in per OneBit layer
    plus every stored tensor that is not a OneBit addition (g, h, norm, packed signs).
    """
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    layers = manifest["layers"]
    additions = tuple(f"{n}.{part}" for n in layers for part in ("g", "h", "norm.", "sign_packed"))
    params = sum(o * i for o, i in layers.values())
    layer_bytes = tensor_bytes = 0
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            numel = int(torch.Size(sl.get_shape()).numel())
            size = numel * _BYTES[sl.get_dtype()]
            tensor_bytes += size
            if key.startswith(additions):
                layer_bytes += size
            if not key.startswith(additions):
                params += numel
    file_bytes = (path / WEIGHTS).stat().st_size
    linear_weights = sum(o * i for o, i in layers.values())
    return {
        "params": params,
        "file_bytes": file_bytes,
        "bf16_bytes": 2 * params,
        "compression_vs_bf16": 2 * params / file_bytes,
        "bits_per_weight_all": 8 * file_bytes / params,
        "bits_per_weight_linear": 8 * layer_bytes / linear_weights,  # signs + g + h + norm, no bias
        "header_bytes": file_bytes - tensor_bytes,
    }
