"""Pack one FakeQuantLinear's weight: the codes and qparams its quantizer says it ships (layer.encode()).

Nothing here computes a scale: a learned quantizer's steps, a clipped MinMax grid, SEQ's alphas all
reach the file exactly as the student used them.

Stored tensors for layer L (weight (out, in), G groups per row):
  L.qweight  (out, ceil(in / (32 // bits))) int32   unsigned codes u = code - qmin (bitpack layout)
  L.scales   (rows, G) float; codebook grids (rows, G, 2)   rows = out, or 1 for one scale per tensor
  L.zeros    (rows, G) uint8 when integral (int grids), else float   only grids with per-group zero points
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qatlab.export.bitpack import pack_codes
from qatlab.export.manifest import config_to_dict, grid_to_dict
from qatlab.layers.fake_linear import FakeQuantLinear


@torch.no_grad()
def pack_codes_layer(layer: FakeQuantLinear) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors keyed by suffix, manifest entry) for one layer with a weight quantizer."""
    qw = layer.encode()
    tensors = {"qweight": pack_codes(qw.unsigned_codes(), qw.grid.bits), "scales": qw.scale}
    if qw.zero is not None:
        integral = bool((qw.zero == qw.zero.round()).all()) and 0 <= float(qw.zero.min()) and float(qw.zero.max()) <= 255
        tensors["zeros"] = qw.zero.to(torch.uint8) if integral else qw.zero.float()
    entry = {
        "kind": "codes",
        "shape": [layer.out_features, layer.in_features],
        "group_size": qw.group_size,
        "scale_shape": list(qw.scale.shape[:2]),  # (rows, G): rows = out, or 1 (per tensor, chunks of the tensor)
        "grid": grid_to_dict(qw.grid),
        "quantizer": layer.weight_quantizer.describe(),
        "act": config_to_dict(layer.act_cfg),
    }
    return tensors, entry
