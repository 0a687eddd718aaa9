"""Init: a one-time step between converting the student and training it (conf/init/*.yaml).

Called as init(student, teacher, layers, calibration) with layers = {name: quantized layer} of the
student and calibration = the first `init_batches` training batches; returns flat facts for the
results row (`init/...`). After it, the recipe re-initializes learned quantizers from the (now
clipped / solved / binarized) latent weights, so any init composes with any quantizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn


class Init:
    name = "init"

    def __call__(self, student: nn.Module, teacher: nn.Module, layers: Mapping[str, nn.Module],
                 calibration: Iterable[Mapping[str, Tensor]]) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"init": self.name}
