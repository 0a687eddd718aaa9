"""DynamicQuantizer: MinMax fake quantization of activations, scales computed on the fly per token
(LLM-QAT's A8, ZeroQuant's token-wise INT8). Owned by a FakeQuantLinear as its input quantizer; no
parameters, nothing to ship (the manifest records its spec so the packed layer quantizes the same way).
"""

from __future__ import annotations

from torch import Tensor, nn

from qatlab.quantizers.primitives import fake_quantize
from qatlab.quantizers.spec import QuantConfig


class DynamicQuantizer(nn.Module):
    def __init__(self, spec: QuantConfig) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: Tensor) -> Tensor:  # (..., in): one scale per token (granularity token)
        return fake_quantize(x, self.spec)

    def extra_repr(self) -> str:
        return self.spec.describe()
