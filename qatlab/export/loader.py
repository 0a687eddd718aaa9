"""load_packed: an inference model from a packed checkpoint, on the HF architecture (no modeling code of ours).

Builds the model from config.json, swaps each layer of the manifest for its packed stand-in
(PackedLinear, PackedOneBitLinear, or a weight-unquantized FakeQuantLinear), loads every tensor
strictly, and re-applies K/V quantization. Activation quantizers travel with each layer's entry.
The dense model is built first (its random Linear weights are freed as the layers are swapped):
peak memory is one dense model in `dtype`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from qatlab.errors import require
from qatlab.export.manifest import WEIGHTS, check_dtype, config_from_dict, read_manifest
from qatlab.export.packed_linear import PackedLinear
from qatlab.export.packed_onebit import PackedOneBitLinear
from qatlab.quant.fake_linear import FakeQuantLinear
from qatlab.quant.kv import enable_kv_quant
from qatlab.quant.swap import swap_linears


def build_layer(name: str, entry: dict[str, Any], linear: nn.Linear, state: dict[str, Tensor]) -> nn.Module:
    """The packed stand-in for layer `name` (linear: the freshly built layer, whose bias Parameter is kept)."""
    kind = entry["kind"]
    act = config_from_dict(entry.get("act"))
    if kind == "dense":
        return FakeQuantLinear(linear.weight, linear.bias, None, act)
    if kind == "int":
        layer = PackedLinear(state[f"{name}.qweight"], state[f"{name}.scales"], state.get(f"{name}.zeros"),
                             linear.bias, entry["shape"][1], config_from_dict(entry["weight"]), act)
    else:
        require(kind == "onebit", f"layer '{name}' has kind {kind!r}; this qatlab knows int, onebit and dense")
        layer = PackedOneBitLinear(state[f"{name}.qweight"], state[f"{name}.g"], state[f"{name}.h"], linear.bias,
                                   entry["norm_affine"], entry["norm_eps"])
    require([layer.out_features, layer.in_features] == entry["shape"],
            f"layer '{name}': the packed tensors do not fit its shape {entry['shape']}")
    return layer


@torch.no_grad()
def load_packed(path: str | Path, dtype: str | None = None, device: str | torch.device = "cpu") -> PreTrainedModel:
    """The packed model in folder `path`, eval mode, no gradients; dtype defaults to the stored one."""
    path = Path(path)
    manifest = read_manifest(path)
    torch_dtype = check_dtype(dtype or manifest["dtype"])
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).to(torch_dtype)
    state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in load_file(str(path / WEIGHTS)).items()}
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
        enable_kv_quant(model, config_from_dict(manifest["kv"]))
    return model.to(device).eval().requires_grad_(False)
