"""Pack one FakeQuantLinear's weight into integer codes and qparams, exactly as its forward quantizes it.

The codes, scales and zero points come from qatlab.quant.primitives.quantize, the function the
fake-quant forward runs, so the packed layer dequantizes to the very values the student computed with.

Stored tensors for layer L (weight (out, in), G groups per row: in / group_size, or 1 for channel):
  L.qweight  (out, ceil(in / (32 // bits))) int32   unsigned codes u = code - qmin (bitpack layout)
  L.scales   (out, G) float; NF grids (out, G, 2)   per-group scale(s); (1, 1[, 2]) for granularity=tensor
  L.zeros    (out, G) uint8                         asymmetric int grids only
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qatlab.export.bitpack import pack_codes
from qatlab.export.manifest import config_to_dict
from qatlab.quant.config import QuantConfig
from qatlab.quant.fake_linear import FakeQuantLinear
from qatlab.quant.primitives import quantize


def groups_shape(cfg: QuantConfig, out_features: int) -> tuple[int, int]:
    """(rows, groups per row) of the stored qparams."""
    return (1, 1) if cfg.granularity == "tensor" else (out_features, -1)


@torch.no_grad()
def pack_int_layer(layer: FakeQuantLinear) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors keyed by suffix, manifest entry) for one layer with an int or NF weight grid."""
    cfg = layer.weight_cfg
    out_features, in_features = layer.out_features, layer.in_features
    codes, scale, zero = quantize(layer.weight, cfg)  # (rows, g) int8/uint8, (rows, 1 or 2), (rows, 1) | None
    unsigned = codes.to(torch.int16).reshape(out_features, in_features) - cfg.qmin
    shape = groups_shape(cfg, out_features)
    tensors = {
        "qweight": pack_codes(unsigned, cfg.bits),
        "scales": scale.reshape(*shape, 2) if cfg.nf else scale.reshape(shape),
    }
    if zero is not None:
        tensors["zeros"] = zero.reshape(shape).to(torch.uint8)  # integer-valued, 0..qmax <= 255
    entry = {
        "kind": "int",
        "shape": [out_features, in_features],
        "weight": config_to_dict(cfg),
        "act": config_to_dict(layer.act_cfg),
    }
    return tensors, entry
