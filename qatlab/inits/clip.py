"""BitDistiller's asymmetric clipping init as an Init (the search itself: qatlab.inits.clip_search)."""

from __future__ import annotations

from typing import Any

from qatlab.inits.base import Init
from qatlab.inits.clip_search import ClipConfig, asymmetric_clip_init, describe_report
from qatlab.layers.fake_linear import FakeQuantLinear
from qatlab.errors import require


class ClipSearch(Init):
    """Per group, the (max, min) shrink pair with the least output error on teacher activations; clamp to it."""

    name = "clip"

    def __init__(self, **options: Any) -> None:
        self.config = ClipConfig.from_dict(options)
        self.report = None  # the last run's ClipReport

    def __call__(self, student, teacher, layers, calibration):
        clip = {n: m for n, m in layers.items() if isinstance(m, FakeQuantLinear) and m.weight_cfg is not None}
        require(len(clip) == len(layers),
                "init=clip searches MinMax grids of fake-quant layers; this recipe's layers are not all FakeQuantLinear "
                "(e.g. quantizer=onebit): use init=none or init=svid")
        self.report = asymmetric_clip_init(student, teacher, clip, calibration, self.config)
        return describe_report(self.report)

    def describe(self):
        return {"init": self.name, "clip_grid": self.config.grid, "clip_max_shrink": self.config.max_shrink}
