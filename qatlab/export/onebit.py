"""Pack one OneBitLinear: its sign matrix 32 per int32 word, plus the value vectors and the norm.

Stored tensors for layer L (weight (out, in)), beside the student's own "L.g", "L.h", "L.norm.*",
"L.bias", which the writer keeps from the state dict:
  L.qweight  (out, ceil(in / 32)) int32   bit k of word j is the sign of element 32 j + k (1: +1, 0: -1)
The latent weight "L.weight" is dropped: only its signs ship.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qatlab.export.bitpack import pack_codes
from qatlab.layers.onebit_linear import OneBitLinear


@torch.no_grad()
def pack_onebit_layer(layer: OneBitLinear) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors keyed by suffix, manifest entry) for one OneBit layer."""
    bits = (layer.weight >= 0).to(torch.uint8)  # binarize's rule: sign(0) = +1
    entry = {
        "kind": "onebit",
        "shape": [layer.out_features, layer.in_features],
        "norm_affine": layer.norm.elementwise_affine,
        "norm_eps": layer.norm.eps,
    }
    return {"qweight": pack_codes(bits, 1)}, entry
