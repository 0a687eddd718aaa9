"""export_packed: write a student as a packed checkpoint (layout: qatlab.export.manifest).

Every FakeQuantLinear with a weight quantizer becomes the codes + qparams its quantizer encodes
(int_export), every OneBitLinear packed signs (onebit), a FakeQuantLinear without one keeps its
dense weight; the latent weights of packed layers are not written. All other tensors are stored as
they are. A sha256 of every tensor and a copy of the layer entries go into the weights file's header,
so the loader can tell a changed manifest or a damaged file from a good one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from qatlab.atomic import atomic_path
from qatlab.errors import require
from qatlab.export.int_export import pack_codes_layer
from qatlab.export.manifest import (WEIGHTS, check_dtype, config_to_dict, header_copy, manifest_fields,
                                    tensor_digest, write_hf_config, write_manifest)
from qatlab.export.onebit import pack_onebit_layer
from qatlab.layers.kv import KVPlacement
from qatlab.layers.fake_linear import FakeQuantLinear
from qatlab.layers.onebit_linear import OneBitLinear
from qatlab.quantizers.spec import QuantConfig


def pack_layer(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """(tensors keyed by suffix, manifest entry) for a quantized layer; None for any other module."""
    if isinstance(module, OneBitLinear):
        return pack_onebit_layer(module)
    if not isinstance(module, FakeQuantLinear):
        return None
    if module.weight_quantizer is None:  # weight left in full precision (an override set it to null)
        entry = {"kind": "dense", "shape": [module.out_features, module.in_features],
                 "act": config_to_dict(module.act_cfg)}
        return {}, entry
    return pack_codes_layer(module)


@torch.no_grad()
def export_packed(student: nn.Module, path: str | Path, dtype: str = "float16", method: str = "",
                  facts: dict[str, Any] | None = None, kv: QuantConfig | None = None,
                  kv_placement: KVPlacement | None = None) -> Path:
    """Write folder `path` (created): config.json, model.safetensors, qatlab.json; returns it.

    dtype: storage dtype of every floating tensor (scales, g/h, embeddings, norms); float32 keeps the
    student's values exactly. kv: the K/V quantizer the loader re-applies (None: none).
    """
    float_dtype = check_dtype(dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state, tied = untied_state(student.state_dict())
    layers = {}
    for name, module in student.named_modules():
        packed = pack_layer(module)
        if packed is None:
            continue
        tensors, entry = packed
        prefix = f"{name}."
        for key in [k for k in state if k.startswith(prefix) and k[len(prefix):].split(".")[0] in
                    ("weight_quantizer", "input_quantizer")]:
            del state[key]  # the quantizer's own parameters ship as the qparams in `tensors`
        if entry["kind"] != "dense":
            del state[f"{name}.weight"]  # the latent weight: only its codes ship
        state.update({f"{name}.{suffix}": t for suffix, t in tensors.items()})
        layers[name] = entry
    require(bool(layers), f"{type(student).__name__} has no quantized layers to pack; export a converted student")
    stored = {k: _stored(v, float_dtype) for k, v in state.items()}
    facts = facts or {}
    manifest = manifest_fields(method=method, bits=facts.get("w_bits"), group_size=facts.get("group_size"),
                               dtype=dtype, layers=layers, tied=tied, facts=facts,
                               kv=None if kv is None else {**config_to_dict(kv),
                                                           **dataclasses.asdict(kv_placement or KVPlacement())},
                               tensors={k: tensor_digest(t) for k, t in stored.items()})
    with atomic_path(path / WEIGHTS) as tmp:
        save_file(stored, str(tmp), metadata={"qatlab_layers": header_copy(manifest)})
    write_hf_config(student.config, path)
    write_manifest(path, manifest)
    return path


def untied_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
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


def _stored(t: Tensor, dtype: torch.dtype) -> Tensor:
    t = t.detach().to("cpu")
    return (t.to(dtype) if t.is_floating_point() else t).contiguous()
