"""load_packed: an inference model from a packed checkpoint, on the HF architecture (no modeling code of ours).

Checks first (each failure names the file, the layer and the key): the manifest's keys; its layer
entries against the copy written into the weights file's header at export; every tensor's sha256
against the manifest; each packed layer's tensor shapes against what its bits and group size imply.
Then builds the model from config.json, swaps each layer of the manifest for its packed stand-in
(PackedLinear, PackedOneBitLinear, or a weight-unquantized FakeQuantLinear), loads every tensor
strictly, and re-applies K/V quantization. Activation quantizers travel with each layer's entry.
The dense model is built first (its random Linear weights are freed as the layers are swapped):
peak memory is one dense model in `dtype`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from qatlab.errors import QatlabError, require
from qatlab.export.bitpack import packed_width
from qatlab.export.manifest import (MANIFEST, WEIGHTS, check_dtype, config_from_dict, first_difference, grid_from_dict,
                                    header_copy, read_hf_config, read_manifest, tensor_digest)
from qatlab.export.packed_linear import PackedLinear
from qatlab.export.packed_onebit import PackedOneBitLinear
from qatlab.layers.fake_linear import FakeQuantLinear
from qatlab.layers.kv import KVPlacement, enable_kv_quant
from qatlab.layers.swap import swap_linears
from qatlab.quantizers.activation import DynamicQuantizer


def build_layer(name: str, entry: dict[str, Any], linear: nn.Linear, state: dict[str, Tensor]) -> nn.Module:
    """The packed stand-in for layer `name` (linear: the freshly built layer, whose bias Parameter is kept)."""
    kind = entry["kind"]
    act = config_from_dict(entry.get("act"))
    if kind == "dense":
        return FakeQuantLinear(linear.weight, linear.bias, None, None if act is None else DynamicQuantizer(act))
    if kind == "codes":
        layer = PackedLinear(state[f"{name}.qweight"], state[f"{name}.scales"], state.get(f"{name}.zeros"),
                             linear.bias, entry["shape"][1], grid_from_dict(entry["grid"], f"layer '{name}'"),
                             entry["group_size"], act)
    else:
        layer = PackedOneBitLinear(state[f"{name}.qweight"], state[f"{name}.g"], state[f"{name}.h"], linear.bias,
                                   entry["norm_affine"], entry["norm_eps"])
    return layer


def check_layer_tensors(name: str, entry: dict[str, Any], state: dict[str, Tensor]) -> None:
    """The shapes a layer's bits and group size imply, against the stored tensors."""
    out, width = entry["shape"]
    if entry["kind"] == "dense":
        return
    bits = 1 if entry["kind"] == "onebit" else grid_from_dict(entry["grid"], f"layer '{name}'").bits
    _expect(state, f"{name}.qweight", (out, packed_width(width, bits)), f"{bits}-bit codes of a {out} x {width} weight")
    if entry["kind"] == "onebit":
        _expect(state, f"{name}.g", (width,), "the input-side vector")
        _expect(state, f"{name}.h", (out,), "the output-side vector")
        return
    group, scales = entry["group_size"], tuple(entry["scale_shape"])
    require(isinstance(group, int) and group > 0 and len(scales) == 2 and scales[0] * scales[1] * group == out * width,
            f"{MANIFEST}: layer '{name}' group_size={group!r} with scale_shape {list(scales)} does not tile its "
            f"{out} x {width} weight")
    codebook = entry["grid"]["kind"] == "codebook"
    _expect(state, f"{name}.scales", scales + ((2,) if codebook else ()), f"one scale per group of {group}")
    if f"{name}.zeros" in state:
        _expect(state, f"{name}.zeros", scales, "one zero point per group")


def _expect(state: dict[str, Tensor], key: str, shape: tuple[int, ...], what: str) -> None:
    require(key in state, f"{WEIGHTS} lacks tensor '{key}' ({what}); the export is incomplete: re-export the model")
    got = tuple(state[key].shape)
    require(got == tuple(shape), f"tensor '{key}' has shape {list(got)} but the manifest implies {list(shape)} ({what}): "
                                 f"{MANIFEST} and {WEIGHTS} disagree; re-export the model")


def verify_export(path: Path, manifest: dict[str, Any]) -> dict[str, Tensor]:
    """Read the weights file and check it against the manifest; returns the tensors as stored."""
    weights = path / WEIGHTS
    require(weights.is_file(), f"'{path}' has no {WEIGHTS}; re-export the model")
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = (f.metadata() or {}).get("qatlab_layers")
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise QatlabError(f"'{weights}' is not a readable safetensors file ({str(e).splitlines()[0]}); it is truncated "
                          "or damaged: re-export the model") from None
    require(header is not None, f"'{weights}' carries no qatlab header; it was not written by qatlab's export")
    if header != header_copy(manifest):
        at_export = json.loads(header)
        raise QatlabError(f"{MANIFEST} was changed after export: {first_difference(at_export, json.loads(header_copy(manifest)))}; "
                          "restore it or re-export the model")
    digests = manifest.get("tensors") or {}
    require(set(digests) == set(state),
            f"{WEIGHTS} and {MANIFEST} list different tensors (e.g. {sorted(set(digests) ^ set(state))[:3]}); re-export")
    for key, tensor in state.items():
        require(tensor_digest(tensor) == digests[key],
                f"tensor '{key}' in {WEIGHTS} does not match its sha256 in {MANIFEST} (the file was changed or damaged "
                "after export); re-export the model")
    for name, entry in manifest["layers"].items():
        check_layer_tensors(name, entry, state)
    return state


@torch.no_grad()
def load_packed(path: str | Path, dtype: str | None = None, device: str | torch.device = "cpu") -> PreTrainedModel:
    """The packed model in folder `path`, eval mode, no gradients; dtype defaults to the stored one."""
    path = Path(path)
    manifest = read_manifest(path)
    torch_dtype = check_dtype(dtype or manifest["dtype"])
    stored = verify_export(path, manifest)
    model = AutoModelForCausalLM.from_config(read_hf_config(path)).to(torch_dtype)
    state = {k: v.to(torch_dtype) if v.is_floating_point() and not k.endswith(".zeros") else v for k, v in stored.items()}
    for key, source in manifest["tied"].items():
        state[key] = state[source]
    layers: dict[str, dict[str, Any]] = manifest["layers"]

    def make(name: str, linear: nn.Linear) -> nn.Module:
        return build_layer(name, layers[name], linear, state)

    swapped = swap_linears(model, make, include=[f"^{re.escape(n)}$" for n in layers], exclude=())
    require(sorted(swapped) == sorted(layers),
            f"the rebuilt {type(model).__name__} lacks layers {sorted(set(layers) - set(swapped))[:3]}; "
            "load with the transformers version that exported it")
    missing, unexpected = model.load_state_dict(state, strict=False)
    require(not missing and not unexpected,
            f"export and model disagree: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    if manifest.get("kv"):
        kv = dict(manifest["kv"])
        placement = KVPlacement(kv.pop("position", "post_rope"), kv.pop("scope", "per_head"))
        enable_kv_quant(model, config_from_dict(kv), placement)
    return model.to(device).eval().requires_grad_(False)
